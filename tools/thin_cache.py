"""`python tools/thin_cache.py ...` is `slkd thin-cache ...` (Megatron-style script entry)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="thin-cache"))
