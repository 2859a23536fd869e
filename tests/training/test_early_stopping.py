"""Early stopping and the best checkpoint: the pure record, and whole runs that stop, keep and export the best,
and stay stopped when started again."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import automodel
from automodel.checkpoint import store
from automodel.training.early_stopping import EvalWatch
from tests.helpers import module_eval_loss, quickstart, read_rows


def test_the_watch_counts_evaluations_without_an_improvement_of_min_delta():
    watch = EvalWatch(patience=2, min_delta=0.1)
    seen = []
    for step, loss in [(10, 3.0), (20, 2.95), (30, 2.85), (40, math.nan), (50, 2.89)]:
        watch = watch.observe(step, loss)
        seen.append((watch.best_step, watch.evals_since_best, watch.should_stop))
    # 2.95 is not 0.1 below 3.0; 2.85 is (2.9 - 2.85 > 0 after 3.0 - 0.1 = 2.9); nan never improves.
    assert seen == [(10, 0, False), (10, 1, False), (30, 0, False), (30, 1, False), (30, 2, True)]
    assert watch.best_loss == 2.85
    assert "for 2 evaluations (best 2.8500 at step 30)" in watch.reason()
    # The record survives a checkpoint; patience and min_delta come from the (maybe changed) config.
    assert EvalWatch(patience=5, min_delta=0.1).resumed(watch.to_json()) == EvalWatch(
        patience=5, min_delta=0.1, best_loss=2.85, best_step=30, evals_since_best=2)
    assert not EvalWatch(patience=0).observe(1, 1.0).observe(2, 2.0).should_stop  # 0: never stops


def test_the_watch_can_follow_a_metric_where_higher_is_better():
    watch = EvalWatch(patience=2, min_delta=0.01, metric="eval_rewards/accuracies")
    for step, accuracy in [(10, 0.50), (20, 0.90), (30, 0.905), (40, 0.85)]:
        watch = watch.observe_row({"step": step, "eval_loss": 9.0, "eval_rewards/accuracies": accuracy})
    assert (watch.best_step, watch.best_value, watch.should_stop) == (20, 0.90, True)
    assert "eval_rewards/accuracies has not improved by 0.01 or more for 2 evaluations (best 0.9000 at step 20)" \
        in watch.reason()
    saved = watch.to_json()
    assert EvalWatch(metric="eval_rewards/accuracies").resumed(saved).best_step == 20
    assert EvalWatch().resumed(saved) == EvalWatch()  # a record of another metric does not carry over


@pytest.mark.slow
def test_a_run_stops_early_exports_its_best_checkpoint_and_stays_stopped(tmp_path):
    # min_delta 1.0: after the first evaluation (step 5) none improves on it by that much, so the best is step 5
    # and with patience 2 the run stops after the evaluation at step 15 (of 40).
    args = ["train.max_steps=40", "train.eval_every=5", "train.log_every=5", "data.validation.limit=32",
            "eval.at_start=false", "train.early_stopping_patience=2", "train.early_stopping_min_delta=1.0",
            "checkpoint.keep_best=true", "checkpoint.keep_last=1", "optim.lr=0.03"]
    cfg = quickstart(tmp_path, *args)
    result = automodel.train(cfg)
    out = result.output_dir
    evals = [(r["step"], r["eval_loss"]) for r in read_rows(out / "metrics.jsonl") if "eval_loss" in r]
    assert [s for s, _ in evals] == [5, 10, 15]  # no second evaluation at the stop
    assert evals[1][1] < evals[0][1]  # it did improve, only by less than min_delta
    m = result.metrics
    assert m["steps"] == 15 and "has not improved by 1 or more for 2 evaluations" in m["stopped_early"]
    assert m["best_step"] == 5 and m["eval_loss"] == evals[0][1] and m["final_eval_loss"] == evals[2][1]
    # The best checkpoint outlives keep_last = 1; the stop was checkpointed.
    assert [p.name for p in store.complete_checkpoints(out)] == ["step_000005", "step_000015"]
    assert store.read_train_state(out / "checkpoints" / "step_000015")["evals"] == {
        "best_loss": evals[0][1], "best_step": 5, "evals_since_best": 2, "metric": "eval_loss"}

    # final/ holds the step-5 weights: the same tensors as that checkpoint, and its eval loss reloaded.
    saved = load_file(out / "checkpoints" / "step_000005" / "params.safetensors")
    final = load_file(result.final_dir / "model.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    loss = module_eval_loss(model, cfg.data, cfg.train.micro_batch_size, AutoTokenizer.from_pretrained(result.final_dir))
    assert loss == pytest.approx(evals[0][1], rel=1e-5)

    # Started again, it resumes at the stop and stops at once: no step, no duplicated row, the same export.
    again = automodel.train(quickstart(tmp_path, *args))
    assert again.metrics["steps"] == 15 and again.metrics["best_step"] == 5 and "stopped_early" in again.metrics
    assert [r["step"] for r in read_rows(out / "metrics.jsonl") if "eval_loss" in r] == [5, 10, 15]
    final = load_file(again.final_dir / "model.safetensors")
    assert all(torch.equal(saved[k], final[k]) for k in saved)
