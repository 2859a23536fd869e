"""`automodel launch`: check the config (and every sweep point) for the world size it will run with, then print
and run the deepspeed command, or write the sbatch script (and sweep.json) and print how to submit it."""

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import attrs

from automodel.config import ConfigError, TrainConfig, load_config, to_toml
from automodel.launcher import Topology, deepspeed_command, topology
from automodel.launcher.partition import NodeGroup, fit, sinfo
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
    k8s: bool = False
    out: Optional[str] = None                 # --k8s: write the manifests under this directory
    sweep: tuple[str, ...] = ()
    sweep_file: Optional[str] = None
    max_parallel: Optional[int] = None
    submit: bool = False
    dry_run: bool = False


@attrs.frozen
class LaunchPlan:
    base: TrainConfig                         # the config with the command line's overrides, validated
    topo: Topology
    points: list[tuple[str, ...]]             # the sweep's override sets (empty: a single run)
    dirs: list[Path]                          # each point's run directory (relative when output_dir is)
    task_overrides: list[tuple[str, ...]]     # each point's overrides plus its output_dir
    max_parallel: int


def plan(args: LaunchArgs) -> LaunchPlan:
    """Loads and checks everything: the config and every sweep point must validate for the world size they
    will run with now, not after hours in the queue."""
    first = load_config(args.config, args.overrides)
    topo = topology(first.launch, args.nodes, args.gpus_per_node, args.nproc_per_node)
    if args.sweep and args.sweep_file:
        raise ConfigError("give --sweep flags or --sweep-file, not both")
    points, max_parallel = grid_from_flags(args.sweep), 0
    if args.sweep_file:
        from_file = read_sweep_file(args.sweep_file)
        points, max_parallel = list(from_file.points), from_file.max_parallel
    if args.max_parallel is not None:
        if args.max_parallel < 0:
            raise ConfigError("--max-parallel must be >= 0 (0: no limit)")
        max_parallel = args.max_parallel
    check_no_output_dir(points)
    base = load_config(args.config, args.overrides, world_size=topo.world_size)
    dirs = run_dirs(Path(base.output_dir), points)
    task_overrides = [(*p, f"output_dir={shell_quote_toml(str(d))}") for p, d in zip(points, dirs)]
    for p, extra in zip(points, task_overrides):
        try:
            load_config(args.config, [*args.overrides, *extra], world_size=topo.world_size)
        except ConfigError as e:
            raise ConfigError(f"sweep point {' '.join(p)}: {e}") from None
    return LaunchPlan(base, topo, points, dirs, task_overrides, max_parallel)


def sbatch_job(args: LaunchArgs, p: LaunchPlan, workdir: Path,
               partition: Optional[list[NodeGroup]] = None) -> SbatchJob:
    """The script's settings; with the partition's node groups (sinfo), checked against what the nodes have."""
    run_dir = (workdir / p.base.output_dir).resolve()
    flags = [f"--nodes {p.topo.nodes}", f"--gpus-per-node {p.topo.gpus_per_node}"]
    if not p.topo.gpus_per_node:
        flags.append(f"--nproc-per-node {p.topo.nproc_per_node}")
    return SbatchJob(
        job_name=p.base.launch.slurm.job_name or run_dir.name, run_dir=run_dir,
        config=run_dir / "slurm" / "config.toml", workdir=workdir, topo=p.topo,
        slurm=fit(p.base.launch.slurm, p.topo, partition),
        sweep=tuple(p.task_overrides), max_parallel=p.max_parallel, source=f"{args.config} ({' '.join(flags)})",
    )


def launch(args: LaunchArgs) -> int:
    if args.slurm and args.k8s:
        raise ConfigError("--slurm or --k8s, not both")
    if args.out and not args.k8s:
        raise ConfigError("--out goes with --k8s (a Slurm script is written under output_dir/slurm/)")
    p = plan(args)
    if args.slurm:
        return _slurm(args, p)
    if args.submit:
        raise ConfigError("--submit goes with --slurm; apply --k8s manifests with kubectl apply -f")
    if args.k8s:
        return _k8s(args, p)
    commands = [deepspeed_command(args.config, [*args.overrides, *extra], p.topo) for extra in p.task_overrides] \
        if p.points else [deepspeed_command(args.config, list(args.overrides), p.topo)]
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    sweep_root = Path(p.base.output_dir)
    if p.points:
        write_sweep_json(sweep_root / "sweep.json", args.config, p.points, [d.resolve() for d in p.dirs], None)
    status = 0
    for i, command in enumerate(commands):  # a local sweep runs its points one after another
        print(f"[{i + 1}/{len(commands)}] {shlex.join(command)}" if p.points else shlex.join(command), flush=True)
        code = subprocess.call(command)
        status = status or code
    if p.points:
        print(f"sweep done; summary: automodel sweep status {sweep_root}")
    return status


def shell_quote_toml(path: str) -> str:
    """A path as a TOML string for an override (`output_dir="runs/x/lr-1e-5"`)."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _slurm(args: LaunchArgs, p: LaunchPlan) -> int:
    workdir = Path.cwd()  # relative paths in the config are relative to it
    job = sbatch_job(args, p, workdir, sinfo())
    script = render(job)
    if args.dry_run:
        sys.stdout.write(script)
        for i, (point, d) in enumerate(zip(p.points, p.dirs)):
            print(f"# task {i}: {' '.join(point)} -> {d}")
        return 0
    slurm_dir, script_path = job.run_dir / "slurm", job.run_dir / "slurm" / "job.sbatch"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    # The config every task reads, frozen at launch: editing X.toml later does not change a queued or requeued job.
    job.config.write_text(f"# Frozen by `automodel launch` from {args.config}; {script_path} runs it.\n"
                          + to_toml(p.base))
    script_path.write_text(script)
    os.chmod(script_path, 0o755)
    if p.points:
        write_sweep_json(job.run_dir / "sweep.json", args.config, p.points,
                         [(workdir / d).resolve() for d in p.dirs], script_path)
        print(f"sweep of {len(p.points)} task(s): {job.run_dir / 'sweep.json'}")
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


def _k8s(args: LaunchArgs, p: LaunchPlan) -> int:
    from automodel.launcher.k8s import K8sRun, dns_label, render

    run = K8sRun(
        base_name=p.base.launch.k8s.name or Path(p.base.output_dir).name,
        config_toml=f"# Frozen by `automodel launch --k8s` from {args.config}.\n" + to_toml(p.base),
        output_dir=p.base.output_dir, topo=p.topo, k8s=p.base.launch.k8s,
        tasks=tuple(p.task_overrides) if p.points else ((),), task_dirs=tuple(d.name for d in p.dirs),
        source=f"{args.config} (--nodes {p.topo.nodes} --gpus-per-node {p.topo.gpus_per_node})",
    )
    text = render(run)
    if not args.out or args.dry_run:
        sys.stdout.write(text)
        return 0
    path = Path(args.out) / f"{dns_label(run.base_name)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"kubectl apply -f {path}")
    return 0
