"""The sbatch script: one srun task per rank (GPU, or CPU process), Slurm's variables mapped to ranks by
launch/run.py, the rendezvous on the allocation's first host, and requeue-on-preemption.

Why srun tasks rather than a launcher per node: Slurm then signals every rank itself (--signal), so each rank
sees SIGUSR1 before the time limit or preemption, they agree on a step, checkpoint and exit 75, and the script
requeues the job, which resumes. A launcher in between would have to forward the signal.
"""

import datetime
import shlex
from pathlib import Path
from typing import Optional

import attrs

from automodel.config.schema import SlurmConfig
from automodel.launcher import Topology, entry_point, python_for
from automodel.exit_status import EXIT_PREEMPTED


@attrs.frozen
class SbatchJob:
    job_name: str
    run_dir: Path          # logs go to run_dir/slurm/
    config: Path           # the frozen config every task reads
    workdir: Path          # the submit directory: relative paths in the config are relative to it
    topo: Topology
    slurm: SlurmConfig
    sweep: tuple[tuple[str, ...], ...] = ()  # one override set per array task (each with its output_dir)
    max_parallel: int = 0
    source: str = ""       # the config file and flags it was made from, for the header


def _sbatch_lines(job: SbatchJob) -> list[str]:
    s, t = job.slurm, job.topo
    logs = job.run_dir / "slurm"
    pattern = "%A_%a" if job.sweep else "%j"
    opts = [f"--job-name={job.job_name}", f"--nodes={t.nodes}", f"--ntasks-per-node={t.nproc_per_node}"]
    if t.gpus_per_node:
        opts.append(f"--gpus-per-node={t.gpus_per_node}")
    opts += [f"--cpus-per-task={s.cpus_per_task}", f"--time={s.time}"]
    opts += [f"--{key}={value}" for key, value in (("partition", s.partition), ("account", s.account),
                                                   ("qos", s.qos), ("mem", s.mem)) if value]
    if s.exclusive:
        opts.append("--exclusive")
    # Requeued starts keep the job id; append so one log holds the whole history.
    opts += [f"--output={logs}/{pattern}.out", f"--error={logs}/{pattern}.err", "--open-mode=append"]
    if s.signal_seconds:
        opts.append(f"--signal=USR1@{s.signal_seconds}")
    if s.requeue:
        opts.append("--requeue")
    if job.sweep:
        limit = f"%{job.max_parallel}" if job.max_parallel else ""
        opts.append(f"--array=0-{len(job.sweep) - 1}{limit}")
    opts += list(s.sbatch)
    return [f"#SBATCH {o}" for o in opts]


def render(job: SbatchJob, now: Optional[datetime.datetime] = None) -> str:
    s, t = job.slurm, job.topo
    now = now or datetime.datetime.now()
    gpus = f"{t.gpus_per_node} GPU(s) per node, one rank each" if t.gpus_per_node else \
        f"{t.nproc_per_node} CPU process(es) per node (gloo)"
    lines = [
        "#!/bin/bash",
        f"# Written by `automodel launch` on {now:%Y-%m-%d %H:%M}{' from ' + job.source if job.source else ''}.",
        f"# {t.nodes} node(s) x {gpus} = {t.world_size} rank(s)"
        + (f"; a job array of {len(job.sweep)} tasks (sweep.json maps each to its overrides)." if job.sweep else "."),
        f"# Submit with: sbatch {job.run_dir / 'slurm' / 'job.sbatch'}",
        *_sbatch_lines(job),
        "",
        "set -euo pipefail",
        f"cd {shlex.join([str(job.workdir)])}",
        "",
    ]
    if s.env or s.setup:
        lines.append("# From [launch.slurm] env and setup.")
        lines += [f"export {key}={shlex.join([value])}" for key, value in s.env.items()]
        if s.setup:  # the user's own lines: files they source cannot be followed from here
            lines.append("# shellcheck disable=SC1090,SC1091")
        lines += list(s.setup)
        lines.append("")
    lines += [
        "# Rendezvous: every rank meets on the first host of the allocation, at a port derived from the job id",
        "# (distinct for concurrent jobs and array tasks, the same for all tasks of one job).",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))",
        'OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"',
        "export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS",
        "# sbatch passes the submitting shell's environment on; a launcher's rank variables left there would win",
        "# over srun's SLURM_PROCID/SLURM_NTASKS (they do, by design, when deepspeed or torchrun runs the ranks).",
        "unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE",
        "",
    ]
    if job.sweep:
        lines += ["# Sweep: array task i applies override set i and writes to its own run directory.",
                  'case "$SLURM_ARRAY_TASK_ID" in']
        lines += [f"  {i}) overrides=({shlex.join(point)}) ;;" for i, point in enumerate(job.sweep)]
        lines += ['  *) echo "no override set for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", ""]
    srun = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={t.nproc_per_node}"]
    if s.container_image:
        mounts = [*s.container_mounts, f"{job.workdir}:{job.workdir}"]
        srun += [f"--container-image={s.container_image}", f"--container-mounts={','.join(mounts)}",
                 f"--container-workdir={job.workdir}"]
    command = shlex.join([*srun, python_for(s.python, s.container_image), *entry_point(), "--config",
                          str(job.config)])
    if job.sweep:
        command += ' "${overrides[@]}"'
    lines += [
        "# A preemption's SIGTERM reaches this shell too: outlive it, so srun's ranks can finish their checkpoint.",
        "trap 'echo \"batch shell: SIGTERM, waiting for the ranks to checkpoint\" >&2' TERM",
        "",
        "# One task per rank; launch/run.py maps SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS to ranks.",
        "status=0",
        f"{command} || status=$?",
        "",
    ]
    if s.requeue:
        lines += [
            f"# Exit {EXIT_PREEMPTED}: the ranks saved a checkpoint on SIGUSR1/SIGTERM (time limit or preemption).",
            "# Requeue: the next start resumes from that checkpoint.",
            f'if [ "$status" -eq {EXIT_PREEMPTED} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {s.max_requeues} ]; then',
            '  echo "requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "  exit 0",
            "fi",
        ]
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"
