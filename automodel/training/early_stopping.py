"""The best evaluation so far and how many evaluations since: early stopping and the best checkpoint.

A pure record: `observe` returns a new one. It travels in each checkpoint's train_state.json, so a resumed run
counts on from where the stopped one was (and a run that stopped early, started again, stops at once).
"""

import math
from typing import Any, Optional

import attrs


@attrs.frozen
class EvalWatch:
    patience: int = 0  # evaluations without improvement that end the run; 0 never ends it
    min_delta: float = 0.0  # the drop below the best that counts as an improvement
    best_loss: float = math.inf
    best_step: Optional[int] = None
    evals_since_best: int = 0

    def observe(self, step: int, eval_loss: float) -> "EvalWatch":
        if eval_loss < self.best_loss - self.min_delta:  # never true of nan
            return attrs.evolve(self, best_loss=eval_loss, best_step=step, evals_since_best=0)
        return attrs.evolve(self, evals_since_best=self.evals_since_best + 1)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience

    def reason(self) -> str:
        return (f"early stopping: eval_loss has not improved by {self.min_delta:g} or more for {self.evals_since_best} "
                f"evaluations (best {self.best_loss:.4f} at step {self.best_step})")

    def to_json(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss if math.isfinite(self.best_loss) else None, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best}

    def resumed(self, saved: Optional[dict[str, Any]]) -> "EvalWatch":
        """This watch (its patience and min_delta from the config) continuing a checkpoint's count."""
        if not saved:
            return self
        best = saved.get("best_loss")
        return attrs.evolve(self, best_loss=math.inf if best is None else float(best), best_step=saved.get("best_step"),
                            evals_since_best=int(saved.get("evals_since_best", 0)))
