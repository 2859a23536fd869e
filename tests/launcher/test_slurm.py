"""On a real Slurm (tests/launcher/slurm_cluster.py): an array sweep, a 2-rank DeepSpeed job under srun against the
deepspeed launcher, and preemption -> checkpoint -> requeue -> resume, all through `automodel launch --slurm`."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, env, train_losses

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole run

AUTOMODEL = [sys.executable, "-m", "automodel"]
QUICK = ["--config", "configs_toml/quickstart.toml", "schedule.warmup_steps=0", "train.log_every=1",
         "eval.generate_samples=0", "data.validation.limit=16", "logging.progress_bar=\"off\"",
         "launch.slurm.cpus_per_task=1", "train.global_batch_size=16", "train.micro_batch_size=8"]


def submit(*argv, **extra_env: str) -> str:
    done = subprocess.run([*AUTOMODEL, "launch", "--slurm", "--submit", "--gpus-per-node", "0", *argv],
                          cwd=REPO, env={**env(), **extra_env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], capture_output=True, text=True).stdout


def wait_done(job: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while squeue(job).strip():
        assert time.time() < deadline, f"job {job} still queued/running: {squeue(job)}"
        time.sleep(1)


def job_states(job: str) -> list[str]:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.findall(r"JobState=(\w+).*?ExitCode=(\S+)", shown, re.S)


def log_of(run_dir: Path, job: str) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob(f"{job}*")))


def test_array_sweep_runs_each_task_with_its_overrides(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    job = submit(*QUICK, f"output_dir={sweep}", "train.max_steps=12", "--sweep", "optim.lr=1e-3,3e-3")
    wait_done(job)
    assert job_states(job) == [("COMPLETED", "0:0")] * 2, log_of(sweep, job)
    tasks = json.loads((sweep / "sweep.json").read_text())["tasks"]
    finals = []
    for task, lr in zip(tasks, (1e-3, 3e-3)):
        run_dir = Path(task["run_dir"])
        assert run_dir.parent == sweep and task["overrides"] == [f"optim.lr={lr:.0e}".replace("e-0", "e-")]
        assert f"lr = {lr}" in (run_dir / "config.toml").read_text()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 12 and (run_dir / "final" / "model.safetensors").is_file()
        finals.append(train_losses(run_dir)[12])
    assert finals[0] != finals[1]  # each task trained with its own learning rate
    status = subprocess.run([*AUTOMODEL, "sweep", "status", str(sweep)], capture_output=True, text=True).stdout
    assert "2/2 done" in status and f"{finals[1]:.4f}" in status, status


def test_two_rank_srun_deepspeed_job_matches_the_deepspeed_launcher(slurm, tmp_path):
    common = [*QUICK, "train.max_steps=4", "train.micro_batch_size=4", "distributed.backend=\"deepspeed\"",
              "distributed.zero_stage=3", "checkpoint.save_final=false", "--nproc-per-node", "2"]
    # A submitting shell with a launcher's rank variables left in it (sbatch passes them on) must not matter.
    job = submit(*common, f"output_dir={tmp_path / 'srun'}", RANK="0", WORLD_SIZE="1")
    # Meanwhile the same config under the deepspeed launcher, by the command `automodel launch` prints and runs.
    local = subprocess.run([*AUTOMODEL, "launch", "--gpus-per-node", "0", *common, f"output_dir={tmp_path / 'ds'}"],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert local.stdout.splitlines()[0].split()[1:3] == ["--num_gpus", "2"]
    wait_done(job)
    assert job_states(job) == [("COMPLETED", "0:0")], log_of(tmp_path / "srun", job)
    log = log_of(tmp_path / "srun", job)
    assert "2 rank(s)" in log and "deepspeed" in log.lower()
    srun, ds = train_losses(tmp_path / "srun"), train_losses(tmp_path / "ds")
    assert sorted(srun) == [1, 2, 3, 4] and srun == ds


def test_preempted_job_checkpoints_requeues_resumes_and_matches(slurm, tmp_path):
    run_dir = tmp_path / "preempted"
    common = [*QUICK, "train.max_steps=60", "--nproc-per-node", "2"]
    job = submit(*common, f"output_dir={run_dir}")
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= 3):
        assert time.time() < deadline and squeue(job).strip(), log_of(run_dir, job)
        time.sleep(0.2)
    # What Slurm does before a time limit or a preemption (--signal=USR1@N), sent by hand.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # Meanwhile the uninterrupted reference: the same 2 ranks without Slurm.
    whole = tmp_path / "whole"
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "launch/run.py", *common[:-2], f"output_dir={whole}"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    wait_done(job)
    log = log_of(run_dir, job)
    assert job_states(job) == [("COMPLETED", "0:0")], log
    stopped = int(re.search(r"stopped at step (\d+) on SIGUSR1", log).group(1))
    assert 3 <= stopped < 60
    assert f"requeueing job {job} (restart 0)" in log
    assert f"at step {stopped}" in log.split("requeueing job")[1]  # the requeued start resumed there
    assert (run_dir / "checkpoints" / f"step_{stopped:06d}" / "COMPLETE").is_file()
    assert train_losses(run_dir) == train_losses(whole) and len(train_losses(whole)) == 60
    assert json.loads((run_dir / "summary.json").read_text())["eval_loss"] == \
        json.loads((whole / "summary.json").read_text())["eval_loss"]
