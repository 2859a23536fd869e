"""The training data as the loop sees it, one type whether it is read in full (a seeded batch plan over indexed
samples) or streamed: how many steps the run has, and from a resumable position the function that gives each step's
host micro-batches and the position after them. Only `training_data` asks which kind it has."""

import math
from typing import Any, Callable, Optional

import attrs

from automodel.config import BatchShape, ConfigError, TrainConfig
from automodel.data import BatchPlan, Mixture
from automodel.data.stream import passes, resumed_line
from automodel.training.forward import Batch
from automodel.training.prefetch import StepData


def planned(plan: BatchPlan, collate: Callable[[list[int]], Batch], rank: int) -> Callable[[int], StepData]:
    """Step s's batches are `plan`'s (a function of s), with no stream position."""
    return lambda step: ([collate(idx) for idx in plan.micro_batches(step, rank)], None)


@attrs.frozen
class TrainingData:
    max_steps: int
    epoch_samples: Optional[int]  # samples per epoch (None: a stream, whose length is not known)
    line: str  # "training: 200 steps of 32 samples (4 accumulation x 8 per rank), 63 steps per epoch"
    open: Callable[[Optional[dict]], Callable[[int], StepData]]  # position (None: the start) -> step -> StepData
    progress: Callable[[Optional[dict]], dict] = lambda position: {}  # a position's fields for the log row

    def resumed_line(self, position: Optional[dict], cfg: TrainConfig) -> Optional[str]:
        """Where a resumed stream stands, for the log (None: data read in full)."""
        return f"data: {resumed_line(position, cfg.data.train)}" if position is not None else None


def training_data(cfg: TrainConfig, shape: BatchShape, rank: int, num_train: int,
                  collate: Optional[Callable[[list[int]], Batch]], mixture: Optional[Mixture],
                  stream: Optional[Callable[[Optional[dict]], Any]], unit: str = "samples") -> TrainingData:
    """Read in full: a BatchPlan over `num_train` samples (weighted by `mixture`), `collate`d per step. Streamed:
    `stream(position)` opens this rank's stream (its `next_step()` gives the steps in order); max_steps says how
    long the run is."""
    accumulation = f"({shape.accumulation_steps} accumulation x {cfg.train.micro_batch_size} per rank)"
    if stream is not None:
        def open_stream(position: Optional[dict]) -> Callable[[int], StepData]:
            opened = stream(position)
            return lambda step: opened.next_step()  # steps come in order, one ahead

        unit = unit if unit != "samples" else "rows"
        return TrainingData(cfg.train.max_steps, None, f"training: {cfg.train.max_steps} steps of "
                            f"{cfg.train.global_batch_size} {unit} {accumulation}", open_stream,
                            lambda position: {"passes": passes(position)})  # each source's pass (rank 0's share)
    plan = BatchPlan(num_train, shape, cfg.seed, mixture)
    max_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch))
    if cfg.schedule.warmup_steps > max_steps:
        raise ConfigError(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) is larger than the run's "
                          f"{max_steps} steps ({cfg.train.epochs} epochs of {plan.steps_per_epoch})")
    line = (f"training: {max_steps} steps of {cfg.train.global_batch_size} {unit} {accumulation}, "
            f"{plan.steps_per_epoch} steps per epoch")
    return TrainingData(max_steps, plan.steps_per_epoch * plan.global_batch_size, line,
                        lambda position: planned(plan, collate, rank))
