"""`automodel launch`: check the config (and every sweep point) for the world size it will run with, then print
and run the deepspeed command, or write the sbatch script (and sweep.json) and print how to submit it."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import attrs

from automodel.config import ConfigError, load_config, to_toml
from automodel.launcher import deepspeed_command, shell_join, submit_dir, topology
from automodel.launcher.slurm import SbatchJob, render
from automodel.launcher.sweep import (
    check_no_output_dir,
    grid_from_flags,
    read_sweep_file,
    run_dirs,
    write_sweep_json,
)


@attrs.frozen
class LaunchArgs:
    config: str
    overrides: tuple[str, ...] = ()
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    nproc_per_node: Optional[int] = None
    slurm: bool = False
    sweep: tuple[str, ...] = ()
    sweep_file: Optional[str] = None
    max_parallel: Optional[int] = None
    submit: bool = False
    dry_run: bool = False


def launch(args: LaunchArgs) -> int:
    base = load_config(args.config, args.overrides)
    topo = topology(base.launch, args.nodes, args.gpus_per_node, args.nproc_per_node)
    if args.sweep and args.sweep_file:
        raise ConfigError("give --sweep flags or --sweep-file, not both")
    points, max_parallel = grid_from_flags(args.sweep), 0
    if args.sweep_file:
        plan = read_sweep_file(args.sweep_file)
        points, max_parallel = list(plan.points), plan.max_parallel
    if args.max_parallel is not None:
        if args.max_parallel < 0:
            raise ConfigError("--max-parallel must be >= 0 (0: no limit)")
        max_parallel = args.max_parallel
    check_no_output_dir(points)

    # Every point must load and validate for this world size now, not after hours in the queue.
    base = load_config(args.config, args.overrides, world_size=topo.world_size)
    sweep_root = Path(base.output_dir)
    dirs = run_dirs(sweep_root, points)
    task_overrides = [(*p, f"output_dir={shell_quote_toml(str(d))}") for p, d in zip(points, dirs)]
    for p, extra in zip(points, task_overrides):
        try:
            load_config(args.config, [*args.overrides, *extra], world_size=topo.world_size)
        except ConfigError as e:
            raise ConfigError(f"sweep point {' '.join(p)}: {e}") from None

    if args.slurm:
        return _slurm(args, base, topo, points, dirs, task_overrides, max_parallel)
    if args.submit:
        raise ConfigError("--submit goes with --slurm")
    commands = [deepspeed_command(args.config, [*args.overrides, *extra], topo) for extra in task_overrides] \
        if points else [deepspeed_command(args.config, list(args.overrides), topo)]
    if args.dry_run:
        print("\n".join(shell_join(c) for c in commands))
        return 0
    if points:
        write_sweep_json(sweep_root / "sweep.json", args.config, points, [d.resolve() for d in dirs], None)
    status = 0
    for i, command in enumerate(commands):  # a local sweep runs its points one after another
        print(f"[{i + 1}/{len(commands)}] {shell_join(command)}" if points else shell_join(command), flush=True)
        code = subprocess.call(command)
        status = status or code
    if points:
        print(f"sweep done; summary: automodel sweep status {sweep_root}")
    return status


def shell_quote_toml(path: str) -> str:
    """A path as a TOML string for an override (`output_dir="runs/x/lr-1e-5"`)."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _slurm(args: LaunchArgs, base, topo, points, dirs, task_overrides, max_parallel: int) -> int:
    workdir = submit_dir()
    run_dir = (workdir / base.output_dir).resolve()
    slurm_dir = run_dir / "slurm"
    script_path, config_path = slurm_dir / "job.sbatch", slurm_dir / "config.toml"
    flags = [f"--nodes {topo.nodes}", f"--gpus-per-node {topo.gpus_per_node}"]
    if not topo.gpus_per_node:
        flags.append(f"--nproc-per-node {topo.nproc_per_node}")
    job = SbatchJob(
        job_name=base.launch.slurm.job_name or run_dir.name, run_dir=run_dir, config=config_path, workdir=workdir,
        topo=topo, slurm=base.launch.slurm, sweep=tuple(task_overrides), max_parallel=max_parallel,
        source=f"{args.config} ({' '.join(flags)})",
    )
    script = render(job)
    if args.dry_run:
        sys.stdout.write(script)
        if points:
            for i, (p, d) in enumerate(zip(points, dirs)):
                print(f"# task {i}: {' '.join(p)} -> {d}")
        return 0
    slurm_dir.mkdir(parents=True, exist_ok=True)
    # The config every task reads, frozen at launch: editing X.toml later does not change a queued or requeued job.
    config_path.write_text(f"# Frozen by `automodel launch` from {args.config}; {script_path} runs it.\n"
                           + to_toml(base))
    script_path.write_text(script)
    os.chmod(script_path, 0o755)
    if points:
        write_sweep_json(run_dir / "sweep.json", args.config, points, [(workdir / d).resolve() for d in dirs],
                         script_path)
        print(f"sweep of {len(points)} task(s): {run_dir / 'sweep.json'}")
    if not args.submit:
        print(f"sbatch {script_path}")
        return 0
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; logs in {slurm_dir}")
    return 0
