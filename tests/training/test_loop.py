"""The loop reads the step's outputs once per log window: no per-step sync (preemption is agreed on the host, the
non-finite guard and the logged values are read together)."""

import attrs
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import automodel
from automodel.recipes import skeleton
from tests.helpers import quickstart, random_batch, read_rows, split_batch, tiny_llama


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host: item(), float(), int(), bool() (aten._local_scalar_dense) and
    tolist() (which reads without an aten op: counted at the Python method); with `shapes`, also the ops whose
    result's size depends on the values (a GPU must sync to allocate it)."""

    SHAPES = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
              torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default,
              torch.ops.aten.unique_dim.default, torch.ops.aten.repeat_interleave.Tensor}

    def __init__(self):
        super().__init__()
        self.count, self.active, self.shapes = 0, True, False
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and (func is torch.ops.aten._local_scalar_dense.default
                            or (self.shapes and func in self.SHAPES)):
            self.count += 1
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.slow  # trains a (short) run
def test_twenty_steps_read_the_device_once_per_log_window(tmp_path, monkeypatch):
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if reads.active and self.is_floating_point():  # (integer tolist()s are the data order, made on the host)
            reads.count += 1
        return tolist(self)

    real_loop = skeleton.run_loop
    windows, step_reads = [], []

    def counting_loop(state, loop, watch):
        save, row, step = loop.save_checkpoint, loop.logger.row, loop.train_step

        def step_counted(*a):
            # The step's own reads, counted apart: there should be none (the batch's padding, trained positions
            # and sample boundaries were worked out on the host; the losses stay on the device until a log window).
            before, reads.shapes = reads.count, True
            try:
                return step(*a)
            finally:
                step_reads.append(reads.count - before)
                reads.count, reads.shapes = before, False

        def save_uncounted(*a):  # checkpoints hash and verify files: not the loop's reads
            reads.active = False
            try:
                save(*a)
            finally:
                reads.active = True

        def logged(r):
            if "loss" in r:
                windows.append(r["step"])
            row(r)

        loop.logger.row = logged
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        try:
            with reads:
                return real_loop(state, attrs.evolve(loop, save_checkpoint=save_uncounted, train_step=step_counted),
                                 watch)
        finally:
            reads.active = False

    monkeypatch.setattr(skeleton, "run_loop", counting_loop)
    result = automodel.train(quickstart(tmp_path, "train.max_steps=20", "train.log_every=10", "train.eval_every=0",
                                        "eval.at_start=false", "data.validation.limit=4", "checkpoint.every=0"))
    assert result.metrics["steps"] == 20 and windows == [10, 20]
    # Unpacked rows (the quickstart's, padded to the longest of each micro-batch): no read inside any step.
    assert step_reads == [0] * 20, (step_reads, reads.seen)
    # One read of (loss, grad_norm, non-finite guard) per window, and the guard's before the final checkpoint.
    assert reads.count == len(windows) + 1


@pytest.mark.parametrize("name", ["adamw", "muon", "adafactor", "soap"])
def test_a_loop_stopped_at_a_checkpoint_and_resumed_from_it_equals_the_uninterrupted_loop(tmp_path, name):
    """The loop with its side effects (metrics rows, checkpoints through the store: commit, choose, restore) on a
    tiny model, in one process and in seconds: 6 steps at once, against 3 steps, the checkpoint chosen and restored,
    then 3 more. The rows and the final weights are bit-identical, with each optimizer (SOAP refreshing its bases
    every 2 steps: before and after the cut)."""
    from automodel import checkpoint
    from automodel.backends import build_functional
    from automodel.config.schema import OptimConfig
    from automodel.loggers import RunLogger
    from automodel.training.loop import Loop, run_loop
    from automodel.training.throughput import Throughput

    cpu = torch.device("cpu")
    batches = [random_batch(4, 12, 64, seed=100 + s) for s in range(6)]
    meta = {"backend": "functional", "global_batch_size": 4, "seed": 0, "world_size": 1, "data": {}}
    config = {"seed": 0, "optim": {"lr": 3e-3}}

    def backend():
        optim = OptimConfig(name=name, lr=3e-3, soap_precondition_frequency=2)
        return build_functional(tiny_llama(), optim=optim, clip_grad_norm=1.0, lr_fn=lambda s: 3e-3,
                                device=cpu, grad_method="autograd", all_reduce=None, rank=0, world_size=1, seed=0,
                                loss_chunk_tokens=0, master_dtype="auto")

    def train(out, b, state, max_steps):
        def save(st, watch):
            checkpoint.save(b.save, st, out, 0, 1, 2, meta, b.tensor_table(st), config)

        out.mkdir(exist_ok=True)
        logger = RunLogger(out, max_steps, "off", start_step=state.step)
        loop = Loop(train_step=b.step, batches=lambda step: (split_batch(batches[step], 2), None), max_steps=max_steps,
                    logger=logger, throughput=Throughput(1), device=cpu, log_every=1, checkpoint_every=3,
                    save_checkpoint=save)
        state, last_row, _ = run_loop(state, loop)
        logger.close()
        return state, last_row

    whole, first = tmp_path / "whole", tmp_path / "cut"
    b = backend()
    end, _ = train(whole, b, b.state, 6)
    b = backend()
    train(first, b, b.state, 3)
    assert [p.name for p in checkpoint.store.candidates(first, "auto")] == ["step_000003"]
    b = backend()
    path = checkpoint.choose(checkpoint.store.candidates(first, "auto"), 0, 1, False, print)
    state, changes = checkpoint.restore(b.load, b.state, path, 0, cpu, meta, config, (), b.tensor_table(b.state))
    assert state.step == 3 and changes == []
    resumed, last_row = train(first, b, state, 6)
    assert last_row["step"] == 6
    assert losses_of(first) == losses_of(whole) and len(losses_of(whole)) == 6
    assert all(torch.equal(resumed.params[k], end.params[k]) for k in end.params)
    assert [p.name for p in checkpoint.store.candidates(first, "auto")] == ["step_000006", "step_000003"]


def losses_of(out) -> dict:
    return {r["step"]: r["loss"] for r in read_rows(out / "metrics.jsonl") if "loss" in r}
