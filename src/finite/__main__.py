"""``python -m finite`` runs the command-line tool."""

import sys

from finite.cli import main

sys.exit(main())
