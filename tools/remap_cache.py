"""`python tools/remap_cache.py ...` is `slkd remap-cache ...` (Megatron-style script entry)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="remap-cache"))
