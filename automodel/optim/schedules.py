"""Learning-rate schedules as pure functions `step -> lr`: linear warmup, then a decay shape."""

import math

from automodel.config import ScheduleConfig


def lr_at(step: int, sched: ScheduleConfig, base_lr: float, max_steps: int) -> float:
    """The learning rate for the update at 0-based `step` of `max_steps`.

    Warmup rises linearly so that step warmup_steps-1 uses base_lr. After it, with p the fraction of
    the decay phase done (0 at its first step), linear and cosine go from base_lr towards min_lr, which
    they would reach one step after the last; wsd holds base_lr until the last `decay_fraction` of all
    steps and then decays linearly.
    """
    warmup = warmup_steps(sched, max_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if sched.kind == "constant":
        return base_lr
    span = base_lr - sched.min_lr
    if sched.kind == "wsd":
        decay_steps = round(sched.decay_fraction * max_steps)
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return base_lr
        return base_lr - span * (step - decay_start) / max(1, max_steps - decay_start)
    progress = (step - warmup) / max(1, max_steps - warmup)
    if sched.kind == "linear":
        return base_lr - span * progress
    return sched.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(sched: ScheduleConfig, max_steps: int) -> int:
    """schedule.warmup_steps, or schedule.warmup_ratio of the run's steps, rounded up."""
    return sched.warmup_steps or math.ceil(sched.warmup_ratio * max_steps)
