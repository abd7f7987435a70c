"""``python -m swav_core.pretrain``: see ``--help``."""
import sys

from .cli import main

sys.exit(main())
