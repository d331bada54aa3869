"""`python tools/build_cache.py ...` is `slkd build-cache ...` (Megatron-style script entry)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="build-cache"))
