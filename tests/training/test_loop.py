"""The loop reads the step's outputs once per log window: no per-step sync (preemption is agreed on the host, the
non-finite guard and the logged values are read together)."""

import attrs
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import automodel
from automodel.recipes import skeleton
from tests.helpers import quickstart


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host: item(), float(), int(), bool() (aten._local_scalar_dense) and
    tolist() (which reads without an aten op: counted at the Python method)."""

    def __init__(self):
        super().__init__()
        self.count, self.active = 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
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
    windows = []

    def counting_loop(state, loop, watch):
        save, row, step = loop.save_checkpoint, loop.logger.row, loop.train_step

        def step_uncounted(*a):
            # Inside the step only transformers reads: its SDPA mask code checks the padding mask on the host (twice
            # per forward), which the loop cannot change; what is counted is the loop's use of the step's outputs.
            reads.active = False
            try:
                return step(*a)
            finally:
                reads.active = True

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
                return real_loop(state, attrs.evolve(loop, save_checkpoint=save_uncounted, train_step=step_uncounted),
                                 watch)
        finally:
            reads.active = False

    monkeypatch.setattr(skeleton, "run_loop", counting_loop)
    result = automodel.train(quickstart(tmp_path, "train.max_steps=20", "train.log_every=10", "train.eval_every=0",
                                        "eval.at_start=false", "data.validation.limit=4", "checkpoint.every=0"))
    assert result.metrics["steps"] == 20 and windows == [10, 20]
    # One read of (loss, grad_norm, non-finite guard) per window, and the guard's before the final checkpoint.
    assert reads.count == len(windows) + 1
