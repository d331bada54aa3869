"""`python tools/merge_cache.py ...` is `slkd merge-cache ...` (Megatron-style script entry)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="merge-cache"))
