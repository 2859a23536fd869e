"""The training loop: batches in, the pure step, and around it every side effect (log, eval, progress)."""

import time
from pathlib import Path
from typing import Callable, Optional

import attrs
import torch

from automodel.data.stream import passes as stream_passes
from automodel.loggers import RunLogger
from automodel.models import FlopModel
from automodel.training.early_stopping import EvalWatch
from automodel.training.forward import to_device
from automodel.training.prefetch import Prefetcher, StepData
from automodel.training.preemption import Preempted, StopRequest
from automodel.training.profile import StepProfiler
from automodel.training.state import TrainState


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


def run_loop(
    state: TrainState,
    *,
    train_step: Callable,
    batches: Callable[[int], StepData],
    max_steps: int,
    world_size: int,
    epoch_samples: Optional[int],
    device: torch.device,
    logger: RunLogger,
    log_every: int,
    eval_every: int = 0,
    evaluate: Optional[Callable[[TrainState], dict]] = None,
    flops: Optional[FlopModel] = None,
    peak_flops: Optional[float] = None,
    checkpoint_every: int = 0,
    save_checkpoint: Optional[Callable[[TrainState, EvalWatch], None]] = None,
    stop: Optional[StopRequest] = None,
    watch: EvalWatch = EvalWatch(),
    keep_best: bool = False,
    profiler: Optional[StepProfiler] = None,
    max_skipped: Optional[int] = None,
) -> tuple[TrainState, dict, EvalWatch]:
    """Steps from state.step to max_steps, or until `watch` says evaluations stopped improving, then writes the final
    checkpoint (if a step ran). Returns the final state, the last logged row and the evaluation record.
    `batches(step)` gives this rank's host micro-batches and, for streamed data, the stream position after them, which
    the new state records (steps are asked for in order, one ahead).

    Timing covers whole log windows (no per-step device sync): ms/step, tokens/s (non-padding input
    tokens over all ranks) and the padding fraction are window averages (run_padding: since the start
    of this process); the loss is that of the logged step. Every step's loss and gradient norm are checked on the
    device and read at each log and before each checkpoint (FiniteGuard). With `keep_best`, each evaluation that
    improves on the best is checkpointed.
    """
    guard = FiniteGuard(device)
    start_step, skipped, saved_at = state.step, 0, None

    def checkpoint(st: TrainState) -> None:
        nonlocal saved_at
        guard.check()
        save_checkpoint(st, watch)
        saved_at = st.step

    last_row: dict = {}
    window_start, window_tokens, window_steps, window_slots, window_flops = time.perf_counter(), 0, 0, 0, 0.0
    run_tokens = run_slots = 0
    # The next step's batches are collated in the background while a step runs.
    prefetch = Prefetcher(batches, max_steps, pin=device.type == "cuda")
    try:
        while state.step < max_steps and not watch.should_stop:
            if profiler is not None:
                profiler.before_step(state.step + 1)
            cpu_batches, stream_position = prefetch.get(state.step)  # collated while the previous step ran
            # Counted on the host (numpy): the loop reads nothing from the device between log windows.
            tokens = sum(int(b["attention_mask"].numpy().sum()) for b in cpu_batches) * world_size
            slots = sum(b["input_ids"].numel() for b in cpu_batches) * world_size
            window_tokens, window_slots = window_tokens + tokens, window_slots + slots
            if flops is not None:  # this rank's work: MFU is per device
                window_flops += sum(flops.of_batch(b) for b in cpu_batches)
            run_tokens, run_slots = run_tokens + tokens, run_slots + slots
            micro_batches = [to_device(b, device) for b in cpu_batches]

            state, metrics = train_step(state, micro_batches)
            if stream_position is not None:
                state = attrs.evolve(state, stream=stream_position)
            if profiler is not None:
                profiler.after_step(state.step)
            if metrics.skipped:
                skipped += 1
                if max_skipped is not None and skipped > max_skipped:
                    raise NonFiniteLoss(
                        f"{skipped} of the {state.step - start_step} steps this process ran had a non-finite loss or "
                        f"gradient norm and were skipped (more than train.max_skipped_steps = {max_skipped}): the run "
                        "is not training; lower optim.lr or check the data. Its checkpoints are the last good ones")
            else:
                guard.observe(metrics.loss, metrics.grad_norm, state.step)

            window_steps += 1
            logger.advance()
            if state.step % log_every == 0 or state.step == max_steps:
                # The one device sync per log window: the logged step's loss and norm and the guard, read together.
                dev = metrics.loss.device
                loss, grad_norm, first_bad, *extras = torch.stack(
                    [metrics.loss.float(), metrics.grad_norm.float().to(dev), guard.first_bad.float().to(dev),
                     *(v.float().to(dev) for v in metrics.extras.values())]).tolist()
                guard.check(int(first_bad))
                seconds = time.perf_counter() - window_start
                tokens_per_s = window_tokens / seconds
                last_row = {
                    "step": state.step, "loss": loss, "lr": metrics.lr, "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s, "ms_per_step": 1000 * seconds / window_steps,
                    "epoch": state.data_position / epoch_samples if epoch_samples else None,
                    "tflops": window_flops / seconds / 1e12 if flops is not None else None,
                    "mfu": window_flops / seconds / peak_flops if flops is not None and peak_flops else None,
                    "padding": 1 - window_tokens / window_slots, "run_padding": 1 - run_tokens / run_slots,
                }
                last_row.update(zip(metrics.extras, extras))  # a preference loss's rewards/accuracies, ...
                if device.type == "cuda":  # the allocator's high-water mark of this rank (no device sync)
                    last_row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if skipped:
                    last_row["skipped_steps"] = skipped
                if state.stream is not None:  # which pass each streamed source is in (rank 0's share)
                    last_row["passes"] = stream_passes(state.stream)
                logger.row(last_row)
                window_start, window_tokens, window_steps, window_slots, window_flops = time.perf_counter(), 0, 0, 0, 0.0
            paused = time.perf_counter()  # evaluations and checkpoints are not step time: the window skips them
            if evaluate is not None and eval_every and state.step % eval_every == 0 and state.step < max_steps:
                row = evaluate(state)
                logger.row(row)
                watch = watch.observe_row(row)
                if save_checkpoint is not None and (watch.should_stop or (keep_best and watch.best_step == state.step)):
                    checkpoint(state)
            if save_checkpoint is not None and checkpoint_every and state.step % checkpoint_every == 0 \
                    and state.step < max_steps and saved_at != state.step:
                checkpoint(state)
            window_start += time.perf_counter() - paused
            if stop is not None and state.step < max_steps and not watch.should_stop and stop.agreed():
                if save_checkpoint is not None and saved_at != state.step:
                    checkpoint(state)
                stop.checkpointed = save_checkpoint is not None
                raise Preempted(state.step, stop.received or "a signal on another rank")
    finally:
        prefetch.close()
    if profiler is not None:
        profiler.close()
    if save_checkpoint is not None and state.step > start_step and saved_at != state.step:
        checkpoint(state)
    return state, last_row, watch
