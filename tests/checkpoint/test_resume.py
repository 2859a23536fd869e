"""Checkpoints of the functional backend: atomic layout, resume equivalence (with dropout), refusals."""

import shutil

import pytest

import automodel
from automodel.checkpoint import store
from tests.helpers import quickstart, read_rows

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole run

# Constant LR, so a run's length does not change its steps; dropout, so the RNG state must be restored.
COMMON = ["schedule.kind=constant", "schedule.warmup_steps=0", "train.log_every=1", "checkpoint.every=2",
          "checkpoint.save_final=false", "eval.generate_samples=0", "eval.at_start=false",
          "data.validation.limit=32", "model.config.attention_dropout=0.2", "train.global_batch_size=16",
          "train.micro_batch_size=8"]


def losses(out):
    return {r["step"]: r["loss"] for r in read_rows(out / "metrics.jsonl") if "loss" in r}


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    whole = automodel.train(quickstart(tmp_path / "whole", *COMMON, "train.max_steps=7"))
    # "Interrupted" after step 5: a shorter run of the same steps, then the same command with more steps.
    cut_cfg = quickstart(tmp_path / "cut", *COMMON, "train.max_steps=5")
    automodel.train(cut_cfg)
    out = cut_cfg.output_dir
    assert [p.name for p in store.complete_checkpoints(out)] == ["step_000004", "step_000005"]  # keep_last = 2
    resumed = automodel.train(quickstart(tmp_path / "cut", *COMMON, "train.max_steps=7"))
    assert losses(resumed.output_dir) == losses(whole.output_dir)  # every step, exactly
    assert resumed.metrics["eval_loss"] == whole.metrics["eval_loss"]
    assert [p.name for p in store.complete_checkpoints(out)] == ["step_000006", "step_000007"]
    state = store.read_train_state(store.complete_checkpoints(out)[-1])
    assert state["step"] == 7 and state["data_position"] == 7 * 16 and state["backend"] == "functional"


def test_resume_ignores_half_written_checkpoints_and_honours_never_and_paths(tmp_path):
    cfg = quickstart(tmp_path / "run", *COMMON, "train.max_steps=4")
    out = automodel.train(cfg).output_dir
    ckpts = out / "checkpoints"
    shutil.copytree(ckpts / "step_000004", ckpts / ".tmp-step_000006")  # crashed while writing
    shutil.copytree(ckpts / "step_000004", ckpts / "step_000008")
    (ckpts / "step_000008" / "COMPLETE").unlink()  # crashed before marking complete
    assert store.candidates(out, "auto") == [ckpts / "step_000004", ckpts / "step_000002"]
    assert store.candidates(out, "never") == []
    assert store.candidates(out, str(ckpts / "step_000002")) == [ckpts / "step_000002"]
    with pytest.raises(automodel.ConfigError, match="not a complete checkpoint directory"):
        store.candidates(out, str(ckpts / "step_000008"))

    again = automodel.train(quickstart(tmp_path / "run", *COMMON, "train.max_steps=6"))
    assert again.metrics["steps"] == 6
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    fresh = automodel.train(quickstart(tmp_path / "run", *COMMON, "train.max_steps=2", "train.resume=never"))
    assert fresh.metrics["steps"] == 2 and sorted(losses(out)) == [1, 2]  # metrics.jsonl started afresh

    assert (ckpts / "latest").read_text().strip() == "step_000002"


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    automodel.train(quickstart(tmp_path / "run", *COMMON, "train.max_steps=2"))
    with pytest.raises(automodel.ConfigError, match=r"written with global_batch_size = 16, this run has 32"):
        automodel.train(quickstart(tmp_path / "run", *COMMON, "train.max_steps=4", "train.global_batch_size=32"))


def test_rerunning_a_finished_run_only_evaluates_and_exports(tmp_path):
    cfg = quickstart(tmp_path / "run", *COMMON, "train.max_steps=2", "checkpoint.save_final=true")
    first = automodel.train(cfg)
    again = automodel.train(cfg)
    assert again.metrics["steps"] == 2 and again.metrics["train_loss"] is None
    assert again.metrics["eval_loss"] == first.metrics["eval_loss"]
    assert (again.final_dir / "model.safetensors").is_file() and sorted(losses(again.output_dir)) == [1, 2]
    # The final evaluation is recorded once (its first record is kept), not once per re-run.
    evals = [r for r in read_rows(again.output_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2]
