"""On a real two-node Slurm (tests/launcher/slurm_cluster.py), all through `automodel launch --slurm`: an array sweep
of 2-node tasks against the 1-node run of the same global batch, a 2-node DeepSpeed ZeRO-3 job against the deepspeed
launcher on one node, preemption -> checkpoint -> requeue -> resume, and the partition check (sinfo) before a script
is written."""

import json
import os
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
         "train.global_batch_size=16", "train.micro_batch_size=8"]


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


def torchrun(overrides: list[str], run_dir: Path) -> None:
    """The same config as 2 ranks on one machine, without Slurm: the reference for multi-node runs."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "launch/run.py", *overrides, f"output_dir={run_dir}"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_array_sweep_of_two_node_tasks_matches_one_node(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    common = [*QUICK, "train.max_steps=12"]
    job = submit(*common, f"output_dir={sweep}", "--nodes", "2", "--sweep", "optim.lr=1e-3,3e-3")
    torchrun(common, tmp_path / "one_node")  # meanwhile: 2 ranks on one node, the shipped lr (3e-3)
    wait_done(job)
    assert job_states(job) == [("COMPLETED", "0:0")] * 2, log_of(sweep, job)
    assert "--nodes=2" in (sweep / "slurm" / "job.sbatch").read_text()
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
    # One rank on each of two nodes (the rendezvous on the first) is the 2-rank run of one node, to the bit.
    two_nodes = train_losses(Path(tasks[1]["run_dir"]))
    assert sorted(two_nodes) == list(range(1, 13)) and two_nodes == train_losses(tmp_path / "one_node")
    status = subprocess.run([*AUTOMODEL, "sweep", "status", str(sweep)], capture_output=True, text=True).stdout
    assert "2/2 done" in status and f"{finals[1]:.4f}" in status, status


def test_two_node_deepspeed_zero3_job_matches_the_deepspeed_launcher_on_one_node(slurm, tmp_path):
    common = [*QUICK, "train.max_steps=4", "train.micro_batch_size=4", "distributed.backend=\"deepspeed\"",
              "distributed.zero_stage=3", "checkpoint.save_final=false"]
    # A submitting shell with a launcher's rank variables left in it (sbatch passes them on) must not matter.
    job = submit(*common, f"output_dir={tmp_path / 'srun'}", "--nodes", "2", RANK="0", WORLD_SIZE="1")
    # Meanwhile the same config on one node under the deepspeed launcher, by the command `automodel launch` runs.
    local = subprocess.run([*AUTOMODEL, "launch", "--gpus-per-node", "0", "--nproc-per-node", "2", *common,
                            f"output_dir={tmp_path / 'ds'}"], cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert local.stdout.splitlines()[0].split()[1:3] == ["--num_gpus", "2"]
    wait_done(job)
    assert job_states(job) == [("COMPLETED", "0:0")], log_of(tmp_path / "srun", job)
    log = log_of(tmp_path / "srun", job)
    assert "2 rank(s)" in log and "deepspeed" in log.lower()
    srun, ds = train_losses(tmp_path / "srun"), train_losses(tmp_path / "ds")
    assert sorted(srun) == [1, 2, 3, 4] and srun == ds


def test_the_partition_is_asked_before_a_script_is_written(slurm, tmp_path):
    def launch(*argv) -> subprocess.CompletedProcess:
        return subprocess.run([*AUTOMODEL, "launch", "--slurm", *QUICK, f"output_dir={tmp_path / 'run'}", *argv],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)

    cpus = os.cpu_count()
    done = launch("--gpus-per-node", "0", "--nproc-per-node", "2", "launch.slurm.cpus_per_task=8")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: this job could never start: 2 rank(s) x launch.slurm.cpus_per_task = 8 is 16 CPUs per node, but the "
        f"nodes of partition debug (sinfo) have {cpus}; set launch.slurm.cpus_per_task = {cpus // 2} (or 0: the "
        "node's CPUs shared among its ranks)"]
    done = launch("--gpus-per-node", "1")
    assert done.returncode == 2 and "have 0 GPU(s); choose a GPU partition" in done.stderr
    done = launch("--gpus-per-node", "0", "--nodes", "4", "train.micro_batch_size=4")
    assert done.returncode == 2 and "--nodes 4, but partition debug (sinfo) has 2 node(s)" in done.stderr
    done = launch("--gpus-per-node", "0", 'launch.slurm.mem="64G"')
    assert done.returncode == 2 and "65536 MB per node, but the nodes of partition debug (sinfo) have 10000" in \
        done.stderr
    done = launch("--gpus-per-node", "0", 'launch.slurm.partition="gpu"')
    assert done.returncode == 2 and 'no partition "gpu"; the partitions are debug' in done.stderr
    assert not (tmp_path / "run").exists()
    # The default takes what the nodes have: their CPUs shared among the node's ranks.
    done = launch("--gpus-per-node", "0", "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr
    assert f"#SBATCH --cpus-per-task={max(1, cpus // 2)}" in (tmp_path / "run" / "slurm" / "job.sbatch").read_text()


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
    torchrun(common[:-2], whole)
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
