"""`python tools/inspect_cache.py ...` is `slkd inspect-cache ...` (Megatron-style script entry)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="inspect-cache"))
