"""``python -m megatron_slkd`` runs the ``slkd`` command."""

import sys

from megatron_slkd.cli import main

sys.exit(main())
