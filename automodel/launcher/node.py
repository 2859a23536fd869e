"""`automodel node`: start this node's ranks of a multi-node run, where no srun starts them (a Kubernetes pod).

    NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=run-0.run MASTER_PORT=29500 \
        python -m automodel node --config config.toml [KEY=VALUE ...]

Each of the node's NPROC_PER_NODE ranks is launch/run.py with RANK, LOCAL_RANK and WORLD_SIZE set; NODE_RANK
falls back to JOB_COMPLETION_INDEX (what an Indexed Job gives each pod). It is the pod's main process, so it is
what Kubernetes signals: SIGTERM and SIGUSR1 are passed to every rank, which agree on a step, checkpoint and exit
75; this process then exits 75 too, which the Job's podFailurePolicy restarts without counting a failure.

Why not torchrun or the deepspeed launcher: on SIGTERM both kill their workers (torchrun after 30 s) and exit 1,
so a preempted pod could neither finish its checkpoint nor say that it did.
"""

import os
import signal
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence

from automodel.config import ConfigError
from automodel.exit_status import EXIT_PREEMPTED, STOP_SIGNALS
from automodel.launcher import entry_point

KILL_AFTER_S = 30  # a rank failed: the others are blocked in a collective that cannot finish


def node_from_env(env: Mapping[str, str]) -> tuple[int, int, int, str, str]:
    """(nnodes, node_rank, nproc_per_node, master_addr, master_port) from the pod's environment."""
    missing = [k for k in ("NNODES", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    node_rank = env.get("NODE_RANK") or env.get("JOB_COMPLETION_INDEX")
    if node_rank is None:
        missing.append("NODE_RANK (or JOB_COMPLETION_INDEX)")
    if missing:
        raise ConfigError(f"automodel node: {', '.join(missing)} not set; it runs in the pods `automodel launch "
                          "--k8s` writes, which set them (docs/k8s.md)")
    try:
        nnodes, rank, nproc = int(env["NNODES"]), int(node_rank), int(env.get("NPROC_PER_NODE") or 1)
    except ValueError:
        raise ConfigError("automodel node: NNODES, NODE_RANK and NPROC_PER_NODE must be integers") from None
    if not (nnodes >= 1 and nproc >= 1 and 0 <= rank < nnodes):
        raise ConfigError(f"automodel node: node rank {rank} of {nnodes} node(s) x {nproc} rank(s) is not a node")
    return nnodes, rank, nproc, env["MASTER_ADDR"], env["MASTER_PORT"]


def exit_code(codes: Sequence[int], first_failure: Optional[int] = None) -> int:
    """The node's status: 0 when every rank finished, 75 when they stopped at a checkpoint, else the failure seen
    first (`first_failure`: the ranks stopped after it may have died of the signal that stopped them), a rank killed
    by a signal as the shell writes it (128 + the signal)."""
    failed = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    if failed:
        code = first_failure if first_failure is not None else failed[0]
        return code if code >= 0 else 128 - code
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def run_node(config: str, overrides: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    env = dict(os.environ if env is None else env)
    nnodes, node_rank, nproc, addr, port = node_from_env(env)
    command = [sys.executable, *entry_point(), "--config", config, *overrides]
    ranks = []
    received: list[int] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        for local in range(nproc):
            rank_env = {**env, "RANK": str(node_rank * nproc + local), "LOCAL_RANK": str(local),
                        "WORLD_SIZE": str(nnodes * nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": addr,
                        "MASTER_PORT": port}
            ranks.append(subprocess.Popen(command, env=rank_env))
        for signum in received:  # arrived while the ranks were starting
            forward(signum, None)
        print(f"automodel node {node_rank}/{nnodes}: ranks {node_rank * nproc}-{node_rank * nproc + nproc - 1} of "
              f"{nnodes * nproc}, rendezvous {addr}:{port}", file=sys.stderr, flush=True)
        return exit_code(*_wait(ranks))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(ranks: list[subprocess.Popen]) -> tuple[list[int], Optional[int]]:
    """Waits for every rank; once one fails (not 0, not 75), the others are terminated, then killed. Returns every
    rank's status and the failure seen first (None if none)."""
    failed_at = first_failure = None
    while True:
        codes = [p.poll() for p in ranks]
        if all(c is not None for c in codes):
            return codes, first_failure
        if failed_at is None and any(c not in (None, 0, EXIT_PREEMPTED) for c in codes):
            failed_at = time.monotonic()
            first_failure = next(c for c in codes if c not in (None, 0, EXIT_PREEMPTED))
            for p in ranks:
                if p.poll() is None:
                    p.terminate()
        if failed_at is not None and time.monotonic() - failed_at > KILL_AFTER_S:
            for p in ranks:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
