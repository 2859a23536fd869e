"""Prefetch: the next step's batches are collated in the background, and a step gets exactly what collating it on the
spot gives, from any starting step (resume)."""

import threading

import torch

from automodel.config import BatchShape, TrainingConfig
from automodel.data import BatchPlan
from automodel.training.forward import host_ready
from automodel.training.batches import planned
from automodel.training.prefetch import Prefetcher


def plan_of(n: int = 40) -> BatchPlan:
    return BatchPlan(n, BatchShape.of(TrainingConfig(global_batch_size=8, micro_batch_size=2, max_steps=10), 2), seed=3)


def collate(idx: list[int]) -> dict:
    ids = torch.tensor([[i + 1, i + 2, i + 3] for i in idx])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_each_step_gets_the_batches_of_its_step_whatever_step_it_starts_at():
    plan = plan_of()
    for start in (0, 7):  # from the start, and resumed at step 7 (across an epoch boundary: 5 steps per epoch)
        prefetch = Prefetcher(planned(plan, collate, rank=1), max_steps=12)
        try:
            for step in range(start, 12):
                got, position = prefetch.get(step)
                assert position is None  # data read in full: no stream position
                want = [host_ready(collate(idx)) for idx in plan.micro_batches(step, 1)]
                assert len(got) == len(want) == 2
                for g, w in zip(got, want):
                    assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) if isinstance(w[k], torch.Tensor) else g[k] == w[k]
                                                        for k in g)
        finally:
            prefetch.close()


def test_the_next_step_is_collated_while_the_current_one_runs():
    plan = plan_of()
    collated_in = {}
    started_next = threading.Event()

    def recording(idx):
        step = next(s for s in range(10) if idx in plan.micro_batches(s, 0))
        collated_in[step] = threading.current_thread().name
        if step == 1:
            started_next.set()
        return collate(idx)

    prefetch = Prefetcher(planned(plan, recording, rank=0), max_steps=10)
    try:
        prefetch.get(0)  # made on the spot (nothing was prefetched), and step 1 starts in the background
        assert started_next.wait(timeout=10)  # ... without anyone asking for it: "the current step" is running
        assert collated_in[0] == threading.current_thread().name
        assert collated_in[1].startswith("automodel-prefetch")
        prefetch.get(1)  # the background's batches (test above: the same as collating on the spot)
    finally:
        prefetch.close()
