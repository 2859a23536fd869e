"""How a global batch splits over ranks and micro-batches: derived here once, from [train] and the world size, and
handed to the data order (BatchPlan), the DeepSpeed JSON and the step's loss scale, which all rely on it."""

from typing import Optional

import attrs

from automodel.config.schema import TrainingConfig


@attrs.frozen
class BatchShape:
    global_batch_size: int  # samples per optimizer step, all ranks together
    micro_batch_size: int  # samples per forward/backward on one rank
    world_size: int = 1

    @classmethod
    def of(cls, train: TrainingConfig, world_size: int) -> "BatchShape":
        return cls(train.global_batch_size, train.micro_batch_size, world_size)

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def problem(self) -> Optional[str]:
        """Why this shape cannot be (one line naming the keys), or None."""
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            return "train.global_batch_size and train.micro_batch_size must be >= 1"
        per_step = self.micro_batch_size * self.world_size
        if self.global_batch_size % per_step:
            return (f"train.global_batch_size ({self.global_batch_size}) must be divisible by train.micro_batch_size "
                    f"({self.micro_batch_size}) x ranks ({self.world_size}) = {per_step}; " + self._fixes())
        return None

    def _fixes(self) -> str:
        """The way out that keeps the recipe (the global batch, hence the optimisation) first, then the one that
        changes it."""
        per_step = self.micro_batch_size * self.world_size
        other = max(per_step, self.global_batch_size // per_step * per_step)
        changes = f"train.global_batch_size = {other} (changes the recipe: another global batch)"
        per_rank, uneven = divmod(self.global_batch_size, self.world_size)
        if uneven or per_rank == 0:
            return f"set {changes}, or run on a number of ranks that divides {self.global_batch_size}"
        micro = max(m for m in range(1, min(self.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
        steps = per_rank // micro
        return (f"set train.micro_batch_size = {micro} (keeps the global batch: {micro} x {self.world_size} ranks x "
                f"{steps} accumulation step{'s' if steps > 1 else ''}), or {changes}")
