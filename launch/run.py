#!/usr/bin/env python
"""Per-rank entry point: what `python`, `deepspeed`, `torchrun` and `srun` start.

    python launch/run.py --config configs_toml/quickstart.toml [KEY=VALUE ...]

Parses the config and overrides, finds this process's rank from the launcher's (or Slurm's) variables
and calls automodel.train. Config errors print one line and exit with status 2.
"""

import sys
from pathlib import Path

# Run from a source checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automodel.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
