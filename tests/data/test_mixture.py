"""Several training sources: the weighted epoch draw, batch plans over it, chained sets."""

from collections import Counter

import torch

from automodel.config import BatchShape
from automodel.data import BatchPlan, Mixture, chain, collate, tokenize_examples
from automodel.data.formats import Example
from automodel.models import byte_level_tokenizer


def test_an_epoch_holds_each_source_by_its_share_repeating_the_small_one():
    mix = Mixture.of([100, 20], [1.0, 1.0], seed=3)
    assert mix.counts() == [60, 60] and mix.epoch_length == 120
    epoch = mix.epoch(0)
    assert len(epoch) == 120 and all(0 <= i < 120 for i in epoch)
    big, small = [i for i in epoch if i < 100], [i for i in epoch if i >= 100]
    assert len(big) == 60 and len(set(big)) == 60  # subsampled: 60 of its 100, none twice
    assert len(small) == 60 and set(Counter(small).values()) == {3}  # 3 full passes over its 20
    # A pure function of (seed, epoch): another instance draws the same; the next epoch draws afresh.
    assert Mixture.of([100, 20], [1.0, 1.0], seed=3).epoch(0) == epoch
    assert mix.epoch(1) != epoch and Mixture.of([100, 20], [1.0, 1.0], seed=4).epoch(0) != epoch


def test_uneven_shares_round_to_the_epoch_length():
    mix = Mixture.of([7, 5, 3], [0.5, 0.3, 0.2], seed=0)
    assert sum(mix.counts()) == 15 and mix.counts() == [8, 4, 3]  # 7.5 / 4.5 / 3.0, largest remainder first
    assert Counter(i < 7 for i in mix.epoch(2))[True] == 8


def test_a_plan_over_a_mixture_computes_any_step_directly():
    mix = Mixture.of([50, 30], [3.0, 1.0], seed=1)
    shape = BatchShape(global_batch_size=8, micro_batch_size=2, world_size=2)
    plan = BatchPlan(80, shape, seed=1, mixture=mix)
    assert plan.steps_per_epoch == 10
    walked = [plan.global_indices(s) for s in range(25)]  # across two epoch boundaries
    fresh = BatchPlan(80, shape, seed=1, mixture=Mixture.of([50, 30], [3.0, 1.0], seed=1))
    assert [fresh.global_indices(s) for s in (24, 3, 17)] == [walked[24], walked[3], walked[17]]
    assert sum(walked[:10], []) == mix.epoch(0)
    share = sum(i < 50 for step in walked[:10] for i in step) / 80
    assert share == 60 / 80  # weight 3 of 4: 60 rows of the 80-row epoch
    assert plan.micro_batches(3, rank=1) == [walked[3][4:6], walked[3][6:8]]


def test_chained_sets_read_each_source_row():
    tok = byte_level_tokenizer(["abcdefgh xyz"])
    a = tokenize_examples([Example((("ab", False), ("cde", True)), ("cde",))], tok, 32, "drop", "a")
    b = tokenize_examples([Example((("x", False), ("yz", True)), ("yz",)),
                           Example((("g", False), ("h", True)), ("h",))], tok, 32, "drop", "b")
    both = chain([a, b], "train")
    assert len(both) == 3 and both.samples == 3
    assert both.input_ids[0] == a.input_ids[0] and both.input_ids[2] == b.input_ids[1]
    assert both.labels[1] == b.labels[0] and both.references[2] == ("h",)
    assert list(both.input_ids.lengths()) == [len(a.input_ids[0]), len(b.input_ids[0]), len(b.input_ids[1])]
    assert both.labels.count_trained() == a.labels.count_trained() + b.labels.count_trained()
    batch = collate(both, [2, 0], pad_id=0)
    assert batch["input_ids"][0, :len(b.input_ids[1])].tolist() == b.input_ids[1]
    assert torch.equal(batch["labels"][1, :len(a.labels[0])], torch.tensor(a.labels[0]))
