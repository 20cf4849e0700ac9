"""``python -m earlyfusion``: the ``earlyfusion`` command (what ``accelerate launch -m earlyfusion ...`` runs)."""

import sys

from earlyfusion.cli import main

sys.exit(main())
