"""``python -m hpc_bkd``: the default job; see ``python -m hpc_bkd --help``."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
