"""Starting 2-process runs for tests: `deepspeed --num_gpus 2` (CPU: 2 processes, gloo) or torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# DeepSpeed compiles a small shared-memory op on first use; keep it between tests and runs.
EXTENSIONS = REPO / "build" / "torch_extensions"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(EXTENSIONS), "PYTHONUNBUFFERED": "1"}


def command(launcher: str, nproc: int = 2) -> list[str]:
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())]
    return [sys.executable]


def run(launcher: str, overrides: list[str], nproc: int = 2, **popen) -> subprocess.CompletedProcess:
    cmd = command(launcher, nproc) + ["launch/run.py", "--config", "configs_toml/quickstart.toml", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, **popen)


def start(launcher: str, overrides: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = command(launcher, nproc) + ["launch/run.py", "--config", "configs_toml/quickstart.toml", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def eval_losses(run_dir: Path) -> list[float]:
    return [r["eval_loss"] for r in rows(run_dir) if "eval_loss" in r]
