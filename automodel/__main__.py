"""`python -m automodel ...` is the `automodel` command (what a launch uses where launch/run.py is absent)."""

import sys

from automodel.cli import main

sys.exit(main())
