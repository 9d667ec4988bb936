"""``python -m opcd`` runs the command line."""

import sys

from opcd.cli import main

sys.exit(main())
