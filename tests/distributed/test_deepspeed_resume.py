"""DeepSpeed checkpoints on 2 CPU processes: a run killed at a random moment, and a streamed run, resume exactly."""

import os
import random
import shutil
import signal
import time

import pytest

from tests import helpers
from tests.distributed.runs import QUIET, DEEPSPEED_TESTS

pytestmark = DEEPSPEED_TESTS

RESUME = QUIET + ["train.log_every=1", "schedule.kind=constant", "schedule.warmup_steps=0",
                  "checkpoint.every=2", "checkpoint.keep_last=2", "checkpoint.save_final=false",
                  "distributed.backend=deepspeed", "optim.lr=1e-3"]


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, stage):
    common = RESUME + [f"distributed.zero_stage={stage}"]
    whole = tmp_path / "whole"
    proc = helpers.launch_run("deepspeed", common + ["train.max_steps=8", f"output_dir={whole}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Kill -9 a long run at a random moment once its first checkpoint is complete: mid-step, mid-evaluation or in
    # the middle of writing, hashing or committing a checkpoint (docs/reliability.md: more trials, measured). The
    # deepspeed launcher keeps the ranks in its process group, which is killed (torchrun gives them sessions of their
    # own).
    cut = tmp_path / "cut"
    victim = helpers.launch_start("deepspeed", common + ["train.max_steps=8", f"output_dir={cut}"])
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step_000002" / "COMPLETE").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 2.5))
    try:
        os.killpg(victim.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had finished
        pass
    victim.wait()
    newest = max(int(p.name[5:]) for p in (cut / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    assert 2 <= newest <= 8
    # Debris a crash can leave: a half-written checkpoint and one never marked complete.
    shutil.copytree(cut / "checkpoints" / f"step_{newest:06d}", cut / "checkpoints" / ".tmp-step_000010")
    shutil.copytree(cut / "checkpoints" / f"step_{newest:06d}", cut / "checkpoints" / "step_000012")
    (cut / "checkpoints" / "step_000012" / "COMPLETE").unlink()

    proc = helpers.launch_run("deepspeed", common + ["train.max_steps=8", f"output_dir={cut}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {cut / 'checkpoints' / f'step_{newest:06d}'} at step {newest}" in proc.stdout
    whole_losses, cut_losses = helpers.train_losses(whole), helpers.train_losses(cut)
    assert list(cut_losses) == list(range(1, 9))  # every step once: a redone step is not logged twice
    assert [cut_losses[s] for s in range(1, 9)] == [whole_losses[s] for s in range(1, 9)]  # identical
    assert helpers.eval_losses(cut)[-1] == helpers.eval_losses(whole)[-1]
    kept = sorted(p.name for p in (cut / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    assert kept[-2:] == ["step_000006", "step_000008"] and len(kept) == 2
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_000008"


def test_streamed_data_resumes_exactly_under_deepspeed(tmp_path):
    """The stream position rides through the engine's steps and its checkpoints as through the functional
    backend's: the run resumed from its step-2 checkpoint (a copy without the later one) has the uninterrupted
    run's losses."""
    common = RESUME + ["distributed.zero_stage=2", "data.train.streaming=true", "data.packing=true",
                       "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=4"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = helpers.launch_run("python", common + [f"output_dir={whole}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, parts)
    shutil.rmtree(parts / "checkpoints" / "step_000004")  # as if stopped after step 2's checkpoint
    proc = helpers.launch_run("python", common + [f"output_dir={parts}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stream resumed after 32 training rows" in proc.stdout
    assert (parts / "checkpoints" / "step_000004" / "stream" / "rank_00000.json").is_file()
    assert helpers.train_losses(parts) == helpers.train_losses(whole) and len(helpers.train_losses(whole)) == 4
