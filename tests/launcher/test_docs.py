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



RUNNERS = ("automodel ", "deepspeed ", "torchrun ", "python launch/run.py ")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command README.md's and docs/' code blocks and the shipped configs' headers show
    (the X.toml / [--flag] lines are synopses, not commands)."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "configs_toml").glob("*.toml"))]:
        in_code = False
        for line in doc.read_text().splitlines():
            if doc.suffix == ".toml":
                if not line.startswith("#"):
                    continue
                line, in_code = line.lstrip("# "), True
            elif line.startswith("```"):
                in_code = not in_code
                continue
            command = line.split("  #")[0].strip()
            if in_code and command.startswith(RUNNERS) and "X.toml" not in command and "[" not in command:
                found.append((doc.name, command))
    return found


def check(argv: list[str]) -> tuple[bool, str]:
    """Runs an `automodel config|launch` command (launch as a dry run: it would start deepspeed or sbatch); loads the
    config of a training command at its rank count, as the run would before anything else."""
    from automodel.cli import main
    from automodel.config import ConfigError, load_config

    if argv[0] == "automodel" and argv[1] in ("config", "launch"):
        try:
            code = main(argv[1:] + (["--dry-run"] if argv[1] == "launch" else []))
        except SystemExit as e:
            code = e.code
        return code in (0, None), ""
    ranks = 1
    for flag in ("--num_gpus", "--nproc_per_node"):
        if flag in argv:
            ranks = int(argv[argv.index(flag) + 1])
    at = argv.index("--config")
    overrides = [a for a in argv[at + 2:] if "=" in a and not a.startswith("-")]
    try:
        load_config(argv[at + 1], overrides, world_size=ranks)
    except ConfigError as e:
        return False, str(e)
    return True, ""


def test_every_documented_command_works(monkeypatch, capsys):
    """What README.md, docs/ and the configs' headers tell a user to type gets past its config, at the rank and node
    counts shown."""
    monkeypatch.chdir(REPO)
    commands = documented_commands()
    assert any("--slurm --nodes 2" in c for _, c in commands) and any("config deepspeed" in c for _, c in commands)
    assert any(c.startswith("deepspeed --num_gpus 8") for _, c in commands) and len(commands) > 40
    failed = []
    for where, command in commands:
        argv = shlex.split(command)
        if argv[0] == "automodel" and argv[1] not in ("config", "launch", "run"):
            continue  # merge, chat, sweep status: they need a finished run
        if argv[:2] == ["automodel", "run"]:
            argv = ["python", "launch/run.py", *argv[2:]]
        capsys.readouterr()
        ok, why = check(argv)
        if not ok:
            failed.append(f"{where}: {command}\n    {why or capsys.readouterr().err.strip()}")
    assert not failed, "documented commands that fail:\n" + "\n".join(failed)


def test_what_the_docs_say_of_a_configs_backend_is_what_it_sets(monkeypatch):
    """A line of README.md or docs/ that names a shipped config and a backend ("ZeRO-2", "functional backend"), and
    each config's own opening lines, agree with the config's [distributed] section."""
    import re

    from automodel.config import load_config

    monkeypatch.chdir(REPO)
    claims = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            names = re.findall(r"configs_toml/(\w+)\.toml", line)
            if len(set(names)) == 1:
                claims.append((doc.name, names[0], line))
    for config in sorted((REPO / "configs_toml").glob("*.toml")):
        head = " ".join(config.read_text().splitlines()[:2])  # the config's one-line description
        claims.append((config.name, config.stem, head))
    checked = 0
    for where, name, line in claims:
        stages = set(re.findall(r"ZeRO-(\d)", line))
        functional = "functional backend" in line
        if not stages and not functional:
            continue
        dist = load_config(REPO / "configs_toml" / f"{name}.toml", world_size=1).distributed
        said = f"{where} says of {name}.toml: {line.strip()}"
        if functional:
            assert dist.backend == "functional", said
        for stage in stages:
            assert dist.backend == "deepspeed" and dist.zero_stage == int(stage), said
        checked += 1
    assert checked >= 8
