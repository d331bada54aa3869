"""`python tools/convert_teacher.py ...` is `slkd convert-teacher ...` (Megatron style)."""

import sys

from megatron_slkd.cli import main

if __name__ == "__main__":
    sys.exit(main(command="convert-teacher"))
