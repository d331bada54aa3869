"""``python -m megatron_slkd.training`` is ``slkd train`` (handy under torchrun)."""

import sys

from megatron_slkd.cli import main

sys.exit(main(command="train"))
