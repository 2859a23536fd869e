"""SIGUSR1 / SIGTERM: checkpoint at the next step boundary, exit 75, resume to the uninterrupted result."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole run

# Constant LR: a run's length does not change its steps, so runs of different max_steps compare step for step.
COMMON = ["schedule.kind=constant", "schedule.warmup_steps=0", "train.log_every=1", "eval.generate_samples=0",
          "eval.at_start=false", "data.validation.limit=16", "checkpoint.save_final=false",
          "train.global_batch_size=16", "train.micro_batch_size=8", "logging.progress_bar=\"off\""]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def start(cmd_prefix, out, *extra):
    return subprocess.Popen([*cmd_prefix, "launch/run.py", "--config", "configs_toml/quickstart.toml", *COMMON,
                             f"output_dir={out}", *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_steps(out, proc, n):
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").exists() and len(losses(out)) >= n):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)


def test_signal_checkpoints_exits_75_and_resume_matches(tmp_path):
    out = tmp_path / "cut"
    proc = start([sys.executable], out, "train.max_steps=100000")
    wait_for_steps(out, proc, 3)
    proc.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, log[-3000:]
    stopped = int(re.search(r"stopped at step (\d+) on SIGUSR1", log).group(1))
    assert (out / "checkpoints" / f"step_{stopped:06d}" / "COMPLETE").is_file()
    assert max(losses(out)) == stopped

    resumed = subprocess.run([sys.executable, "launch/run.py", "--config", "configs_toml/quickstart.toml", *COMMON,
                              f"output_dir={out}", f"train.max_steps={stopped + 3}"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stdout
    whole = tmp_path / "whole"
    ran = subprocess.run([sys.executable, "launch/run.py", "--config", "configs_toml/quickstart.toml", *COMMON,
                          f"output_dir={whole}", f"train.max_steps={stopped + 3}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert losses(out) == losses(whole) and len(losses(whole)) == stopped + 3


def test_ranks_agree_to_stop_at_the_same_step(tmp_path):
    """Only one of two ranks gets the signal; both stop at the same step and write one checkpoint."""
    out = tmp_path / "two"
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], out,
                 "train.max_steps=100000")
    wait_for_steps(out, proc, 3)
    children = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    assert len(children) == 2
    rank_one = next(pid for pid in children if b"\0RANK=1\0" in b"\0" + open(f"/proc/{pid}/environ", "rb").read())
    os.kill(rank_one, signal.SIGUSR1)  # rank 1 gets it; rank 0, which logs, learns it from the agreement
    log = proc.communicate(timeout=120)[0]
    stops = re.findall(r"stopped at step (\d+)", log)
    assert stops, log[-3000:]
    step = int(stops[0])
    ckpt = out / "checkpoints" / f"step_{step:06d}"
    assert (ckpt / "COMPLETE").is_file()
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert f"stopped at step {step} on a signal on another rank" in log


@pytest.mark.parametrize("sig, after", [(signal.SIGTERM, 1.0), (signal.SIGUSR1, 0.6)])
def test_a_signal_in_the_first_second_is_acted_on_not_fatal(tmp_path, sig, after):
    """SIGTERM/SIGUSR1 while the entry point is still importing torch: remembered from its first lines, the run
    exits with the resume status (75) before training, not killed by the signal (-15, -10)."""
    out = tmp_path / "early"
    proc = start([sys.executable], out, "train.max_steps=100000")
    time.sleep(after)
    assert proc.poll() is None
    proc.send_signal(sig)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, log[-3000:]
    assert f"stopped before training (step 0) on {signal.Signals(sig).name}; nothing new to save" in log
