"""The best evaluation so far and how many evaluations since: early stopping and the best checkpoint.

A pure record: `observe` returns a new one. It travels in each checkpoint's train_state.json, so a resumed run
counts on from where the stopped one was (and a run that stopped early, started again, stops at once).
"""

import math
from typing import Any, Optional

import attrs


# Metrics an evaluation may be judged by, and whether a higher value is better.
HIGHER_IS_BETTER = {"eval_loss": False, "eval_rewards/accuracies": True}


@attrs.frozen
class EvalWatch:
    patience: int = 0  # evaluations without improvement that end the run; 0 never ends it
    min_delta: float = 0.0  # the change past the best that counts as an improvement
    best_loss: float = math.inf  # the best score so far (lower is better: a higher-is-better metric is negated)
    best_step: Optional[int] = None
    evals_since_best: int = 0
    metric: str = "eval_loss"  # the evaluation row's key the watch follows (HIGHER_IS_BETTER)

    def score(self, row: dict) -> float:
        """The row's value of the metric, as a score where lower is better."""
        return -row[self.metric] if HIGHER_IS_BETTER[self.metric] else row[self.metric]

    def observe(self, step: int, score: float) -> "EvalWatch":
        if score < self.best_loss - self.min_delta:  # never true of nan
            return attrs.evolve(self, best_loss=score, best_step=step, evals_since_best=0)
        return attrs.evolve(self, evals_since_best=self.evals_since_best + 1)

    def observe_row(self, row: dict) -> "EvalWatch":
        return self.observe(row["step"], self.score(row))

    @property
    def best_value(self) -> float:
        """The best value of the metric itself."""
        return -self.best_loss if HIGHER_IS_BETTER[self.metric] else self.best_loss

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience

    def reason(self) -> str:
        return (f"early stopping: {self.metric} has not improved by {self.min_delta:g} or more for "
                f"{self.evals_since_best} evaluations (best {self.best_value:.4f} at step {self.best_step})")

    def to_json(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss if math.isfinite(self.best_loss) else None, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best, "metric": self.metric}

    def resumed(self, saved: Optional[dict[str, Any]]) -> "EvalWatch":
        """This watch (its patience and min_delta from the config) continuing a checkpoint's count; a record of
        another metric (train.best_metric changed) is not continued."""
        if not saved or saved.get("metric", "eval_loss") != self.metric:
            return self
        best = saved.get("best_loss")
        return attrs.evolve(self, best_loss=math.inf if best is None else float(best), best_step=saved.get("best_step"),
                            evals_since_best=int(saved.get("evals_since_best", 0)))
