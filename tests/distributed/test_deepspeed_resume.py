"""DeepSpeed checkpoints on 2 CPU processes: a run killed at a random moment, and a streamed run, resume exactly."""

import json
import os
import random
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

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


@pytest.mark.parametrize("stage, offload, saved_on, resumed_on, data", [
    (None, False, 2, 1, "file"), (None, False, 1, 2, "mixed"), (None, False, 2, 1, "stream"),
    (None, False, 1, 2, "mixed stream"), (0, False, 2, 1, "file"), (2, False, 2, 1, "stream"),
    (2, False, 1, 2, "file"), (3, False, 2, 1, "file"), (3, False, 1, 2, "mixed"), (3, True, 2, 1, "file")])
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path, stage, offload, saved_on, resumed_on, data):
    """Written on `saved_on` ranks, resumed on `resumed_on` (the same global batch: 1 x 4 accumulation x 8 or 2 x 2 x
    8): the ZeRO shards go through DeepSpeed's universal checkpoint, and steps 3-4 are the uninterrupted run's to
    float32 rounding (the ranks sum gradients in another order), as are its final weights; the checkpoint itself is
    untouched, and the converted copy gone. A converted copy left half-written (a kill during the conversion) is
    converted again. (stage None: the functional backend, whose ranks each saved the whole state, as did ZeRO-0's
    (no conversion); `mixed`: two weighted sources, the mixture a function of seed and step, so it continues in the
    global order too; `stream`: streamed and packed, the shards of the first start read by the ranks of the second.)"""
    common = RESUME + ["train.max_steps=4", "train.global_batch_size=32", "train.micro_batch_size=8",
                       "checkpoint.save_final=true"]
    common += ["distributed.backend=functional"] if stage is None else [f"distributed.zero_stage={stage}"]
    if offload:
        common += ["distributed.offload_optimizer=cpu"]
    streaming = "true" if "stream" in data else "false"
    if "mixed" in data:
        small = helpers.write_jsonl(tmp_path / "small.jsonl",
                                    [{"instruction": f"count {i}", "output": str(i) * 3} for i in range(40)])
        common += [f"data.train=[{{source = {json.dumps(str(helpers.ASSETS / 'train.jsonl'))}, format = "
                   f"\"instruction\", weight = 1.0, streaming = {streaming}}}, {{source = {json.dumps(str(small))}, "
                   f"format = \"instruction\", weight = 1.0, name = \"small\", streaming = {streaming}}}]"]
    elif "stream" in data:
        common += ["data.train.streaming=true"]
    if "stream" in data:
        common += ["data.packing=true"]
    launcher = {1: "python", 2: "torchrun"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = helpers.launch_run(launcher[saved_on], common + [f"output_dir={whole}"], nproc=saved_on)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, parts)
    shutil.rmtree(parts / "checkpoints" / "step_000004")
    step2 = parts / "checkpoints" / "step_000002"
    digests = {p: p.read_bytes() for p in step2.rglob("*") if p.is_file()}
    converts = stage not in (None, 0)
    if converts:  # debris of a killed conversion
        (parts / "checkpoints" / ".universal-step_000002" / "engine").mkdir(parents=True)

    proc = helpers.launch_run(launcher[resumed_on], common + [f"output_dir={parts}"], nproc=resumed_on)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed from {step2} at step 2" in proc.stdout
    assert f"ranks {saved_on} -> {resumed_on}" in (parts / "configs" / "step_000002.toml").read_text()
    if converts:
        assert (f"{step2} was written by {saved_on} rank(s); its ZeRO-{stage} shards were joined into DeepSpeed's "
                f"universal checkpoint and cut again for {resumed_on}") in proc.stdout
        assert "is incomplete (no manifest); converting again" in proc.stdout
    assert not list((parts / "checkpoints").glob(".universal-*"))
    assert {p: p.read_bytes() for p in step2.rglob("*") if p.is_file()} == digests

    if "stream" in data:
        # Shard 0 of the first start's: 2 steps of 32 / saved_on rows.
        assert f"data: stream resumed after {2 * 32 // saved_on} training rows of shard 0" in proc.stdout
    got, ref = helpers.train_losses(parts), helpers.train_losses(whole)
    assert list(got) == [1, 2, 3, 4] and [got[1], got[2]] == [ref[1], ref[2]]
    assert [got[3], got[4]] == pytest.approx([ref[3], ref[4]], rel=1e-5)
    exported, expected = (load_file(d / "final" / "model.safetensors") for d in (parts, whole))
    for key, tensor in expected.items():
        torch.testing.assert_close(exported[key], tensor, rtol=1e-4, atol=3e-5)


def test_a_kill_during_the_universal_conversion_leaves_the_checkpoint_usable(tmp_path):
    """kill -9 of the resuming process while rank 0 joins the ZeRO-2 shards of a 2-rank checkpoint for 1 rank: the
    checkpoint's bytes are untouched, the half-written copy is only ever under its temporary name, and the next start
    converts again and resumes to the uninterrupted run's losses."""
    common = RESUME + ["distributed.zero_stage=2", "train.max_steps=4", "train.global_batch_size=32",
                       "train.micro_batch_size=8"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = helpers.launch_run("torchrun", common + [f"output_dir={whole}"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, parts)
    shutil.rmtree(parts / "checkpoints" / "step_000004")
    step2 = parts / "checkpoints" / "step_000002"
    digests = {p: p.read_bytes() for p in step2.rglob("*") if p.is_file()}
    copy, tmp = parts / "checkpoints" / ".universal-step_000002", parts / "checkpoints" / ".universal-step_000002.tmp"

    victim = helpers.launch_start("python", common + [f"output_dir={parts}"], nproc=1)
    deadline = time.time() + 300
    while not tmp.exists():  # the conversion has begun (the folder is made just before DeepSpeed's converter runs)
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()[-3000:]
        time.sleep(0.002)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert tmp.exists() and not copy.exists()  # killed mid-way: nothing under the name a resume would trust
    assert {p: p.read_bytes() for p in step2.rglob("*") if p.is_file()} == digests

    proc = helpers.launch_run("python", common + [f"output_dir={parts}"], nproc=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed from {step2} at step 2" in proc.stdout and "universal checkpoint" in proc.stdout
    assert not list((parts / "checkpoints").glob(".universal-*"))  # the debris and the new copy, both gone
    got, ref = helpers.train_losses(parts), helpers.train_losses(whole)
    assert list(got) == [1, 2, 3, 4] and [got[3], got[4]] == pytest.approx([ref[3], ref[4]], rel=1e-5)
