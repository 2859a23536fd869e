"""docs/slurm.md shows a script `automodel launch` generates; this keeps it what the generator writes.
Regenerate with: python -m tests.launcher.test_docs"""

import datetime
import shlex
from pathlib import Path

import attrs

from automodel.cli import build_parser
from automodel.launcher.main import LaunchArgs, plan, sbatch_job
from automodel.launcher.slurm import render
from tests.helpers import REPO

COMMAND = ("automodel launch --config configs_toml/llm_lora.toml --slurm --nodes 2 --sweep optim.lr=1e-4,3e-4 "
           "train.micro_batch_size=1 launch.slurm.partition=gpu")
HOME = Path("/home/me/automodel")  # the documented submit directory and its venv


def example() -> str:
    a = build_parser().parse_args(shlex.split(COMMAND)[1:])
    args = LaunchArgs(config=a.config, overrides=tuple(a.overrides), nodes=a.nodes, slurm=True, sweep=tuple(a.sweep))
    job = sbatch_job(args, plan(args), HOME)
    job = attrs.evolve(job, slurm=attrs.evolve(job.slurm, python=str(HOME / ".venv/bin/python")))
    return render(job, now=datetime.datetime(2026, 11, 28, 9, 0))


def test_the_documented_script_is_what_launch_writes(monkeypatch):
    monkeypatch.chdir(REPO)
    doc = (REPO / "docs" / "slurm.md").read_text()
    assert COMMAND in doc
    assert example() in doc, "docs/slurm.md is stale: regenerate its script with python -m tests.launcher.test_docs"


if __name__ == "__main__":
    print(example(), end="")
