"""``python -m hpc_bkd``: the default job; see ``python -m hpc_bkd --help``."""
import sys

from hpc_bkd.cli.main import main

sys.exit(main(sys.argv[1:]))
