"""`python tools/prepare_data.py ...` is `slkd prepare-data ...` (Megatron-style script entry)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="prepare-data"))
