"""`python tools/describe_data.py ...` is `slkd describe-data ...` (Megatron-style script entry)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="describe-data"))
