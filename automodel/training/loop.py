"""The training loop: batches in, the pure step, and around it every side effect (log, eval, progress)."""

import time
from pathlib import Path
from typing import Callable, Optional

import attrs
import torch

from automodel.loggers import RunLogger
from automodel.training.early_stopping import EvalWatch
from automodel.training.forward import to_device
from automodel.training.prefetch import Prefetcher, StepData
from automodel.training.preemption import Preempted, StopRequest
from automodel.training.profile import StepProfiler
from automodel.training.state import TrainState
from automodel.training.throughput import Throughput


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm was not finite (the run stops; its checkpoints stay the last good ones)."""


class FiniteGuard:
    """Watches every applied step's loss and gradient norm on the device, without a sync, so that no checkpoint is
    ever written after a non-finite step: `check()` (one sync) raises NonFiniteLoss naming the first such step."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, first: Optional[int] = None) -> None:
        """`first`: the value of first_bad when the caller has read it already (with the log window's values)."""
        first = int(self.first_bad) if first is None else first
        if first >= 0:
            raise NonFiniteLoss(f"the loss or gradient norm is not finite at step {first}: the run stops, and no "
                                "checkpoint was written after it (the newest is the last good one); lower optim.lr, "
                                "keep optim.clip_grad_norm on, use model.dtype = \"float32\", or set "
                                "train.on_nonfinite = \"skip\"")


@attrs.frozen
class TrainResult:
    output_dir: Path
    metrics: dict  # steps, train_loss, eval_loss, exact_match (and exact_match_at_start), wall_s
    final_dir: Optional[Path] = None  # the saved HF model, when checkpoint.save_final


@attrs.frozen
class Loop:
    """What the loop runs: the step and the batches, how far, and the side effects around them (built once, by the
    recipe skeleton)."""

    train_step: Callable  # (state, host micro-batches on the device) -> (state, StepMetrics)
    batches: Callable[[int], StepData]  # step -> this rank's host micro-batches and the stream position after them
    max_steps: int
    logger: RunLogger
    throughput: Throughput
    device: torch.device
    log_every: int
    epoch_samples: Optional[int] = None  # samples per epoch (None: streamed)
    eval_every: int = 0
    evaluate: Optional[Callable[[TrainState], dict]] = None
    checkpoint_every: int = 0
    save_checkpoint: Optional[Callable[[TrainState, EvalWatch], None]] = None
    stop: Optional[StopRequest] = None
    keep_best: bool = False  # checkpoint each evaluation that improves on the best
    profiler: Optional[StepProfiler] = None
    max_skipped: Optional[int] = None  # on_nonfinite = "skip": stop once more steps than this were skipped
    progress: Callable[[Optional[dict]], dict] = lambda position: {}  # a data position's fields for the log row


def run_loop(state: TrainState, loop: Loop, watch: EvalWatch = EvalWatch()) -> tuple[TrainState, dict, EvalWatch]:
    """Steps from state.step to max_steps, or until `watch` says evaluations stopped improving, then writes the final
    checkpoint (if a step ran). Returns the final state, the last logged row and the evaluation record. Batches are
    asked for in order, one ahead; the new state records a stream's position.

    A step reads nothing from the device: its loss and gradient norm are read once per log window (the logged
    step's), and every step's are checked on the device (FiniteGuard) and read at each log and before each
    checkpoint. Throughput is a window average (throughput.py).
    """
    guard = FiniteGuard(loop.device)
    start_step, skipped, saved_at = state.step, 0, None
    max_steps, logger, meter, profiler = loop.max_steps, loop.logger, loop.throughput, loop.profiler

    def checkpoint(st: TrainState) -> None:
        nonlocal saved_at
        guard.check()
        loop.save_checkpoint(st, watch)
        saved_at = st.step

    last_row: dict = {}
    # The next step's batches are collated in the background while a step runs.
    prefetch = Prefetcher(loop.batches, max_steps, pin=loop.device.type == "cuda")
    try:
        while state.step < max_steps and not watch.should_stop:
            if profiler is not None:
                profiler.before_step(state.step + 1)
            cpu_batches, stream_position = prefetch.get(state.step)  # collated while the previous step ran
            meter.add(cpu_batches)
            state, metrics = loop.train_step(state, [to_device(b, loop.device) for b in cpu_batches])
            if stream_position is not None:
                state = attrs.evolve(state, stream=stream_position)
            if profiler is not None:
                profiler.after_step(state.step)
            if metrics.skipped:
                skipped += 1
                if loop.max_skipped is not None and skipped > loop.max_skipped:
                    raise NonFiniteLoss(
                        f"{skipped} of the {state.step - start_step} steps this process ran had a non-finite loss or "
                        f"gradient norm and were skipped (more than train.max_skipped_steps = {loop.max_skipped}): the "
                        "run is not training; lower optim.lr or check the data. Its checkpoints are the last good ones")
            else:
                guard.observe(metrics.loss, metrics.grad_norm, state.step)
            logger.advance()

            if state.step % loop.log_every == 0 or state.step == max_steps:
                last_row = log_row(state, metrics, guard, meter, skipped, loop)
                logger.row(last_row)
            with meter.paused():
                if loop.evaluate is not None and loop.eval_every and state.step % loop.eval_every == 0 \
                        and state.step < max_steps:
                    row = loop.evaluate(state)
                    logger.row(row)
                    watch = watch.observe_row(row)
                    if loop.save_checkpoint is not None and (
                            watch.should_stop or (loop.keep_best and watch.best_step == state.step)):
                        checkpoint(state)
                if loop.save_checkpoint is not None and loop.checkpoint_every and \
                        state.step % loop.checkpoint_every == 0 and state.step < max_steps and saved_at != state.step:
                    checkpoint(state)
            stop = loop.stop
            if stop is not None and state.step < max_steps and not watch.should_stop and stop.agreed():
                if loop.save_checkpoint is not None and saved_at != state.step:
                    checkpoint(state)
                stop.checkpointed = loop.save_checkpoint is not None
                raise Preempted(state.step, stop.received or "a signal on another rank")
    finally:
        prefetch.close()
    if profiler is not None:
        profiler.close()
    if loop.save_checkpoint is not None and state.step > start_step and saved_at != state.step:
        checkpoint(state)
    return state, last_row, watch


def log_row(state: TrainState, metrics, guard: FiniteGuard, meter: Throughput, skipped: int, loop: Loop) -> dict:
    """The logged step's row. The one device sync per log window: its loss and norm and the guard, read together."""
    dev = metrics.loss.device
    loss, grad_norm, first_bad, *extras = torch.stack(
        [metrics.loss.float(), metrics.grad_norm.float().to(dev), guard.first_bad.float().to(dev),
         *(v.float().to(dev) for v in metrics.extras.values())]).tolist()
    guard.check(int(first_bad))
    row = {"step": state.step, "loss": loss, "lr": metrics.lr, "grad_norm": grad_norm, **meter.window(),
           "epoch": state.data_position / loop.epoch_samples if loop.epoch_samples else None}
    row.update(zip(metrics.extras, extras))  # a preference loss's rewards/accuracies, ...
    if loop.device.type == "cuda":  # the allocator's high-water mark of this rank (no device sync)
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(loop.device) / 2**30
    if skipped:
        row["skipped_steps"] = skipped
    row.update(loop.progress(state.stream))  # where the data stands (a stream: each source's pass)
    return row
