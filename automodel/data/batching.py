"""Which samples a step sees (a pure function of seed, step, rank, world) and how they become tensors."""

import functools
from typing import Optional, Sequence

import attrs
import numpy as np
import torch

from automodel.config import BatchShape, ConfigError
from automodel.data.mixture import Mixture
from automodel.data.tokenize import TokenizedSet
from automodel.loss import IGNORE_INDEX


@attrs.frozen
class BatchPlan:
    """Each epoch is a seeded permutation of the samples (with a `mixture`, its weighted draw over the sources);
    step s takes the next `global_batch_size` of it (the tail that does not fill a batch is skipped). Rank r takes a
    contiguous slice of that global batch and splits it into micro-batches. Nothing is replayed on resume: step s is
    computed directly."""

    num_samples: int
    shape: BatchShape
    seed: int = 0
    mixture: Optional[Mixture] = None

    def __attrs_post_init__(self):
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {self.num_samples} samples, fewer than one global batch "
                              f"({self.global_batch_size}); lower train.global_batch_size or add data")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def global_batch_size(self) -> int:
        return self.shape.global_batch_size

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.shape.accumulation_steps

    def global_indices(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_batch_size
        order = self.mixture.epoch(epoch) if self.mixture is not None else _permutation(self.num_samples, self.seed,
                                                                                           epoch)
        return order[start:start + self.global_batch_size]

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """The sample indices of each of this rank's micro-batches at `step`."""
        per_rank = self.shape.per_rank
        mine = self.global_indices(step)[rank * per_rank:(rank + 1) * per_rank]
        m = self.shape.micro_batch_size
        return [mine[i:i + m] for i in range(0, per_rank, m)]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def collate(dataset: TokenizedSet, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows `indices` of `dataset` as a batch (collate_rows)."""
    packed = dataset.position_ids is not None
    return collate_rows([(dataset.input_ids.array(i), dataset.labels.array(i),
                          dataset.position_ids.array(i) if packed else None) for i in indices], pad_id)


def collate_rows(rows: Sequence[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]],
                 pad_id: int) -> dict[str, torch.Tensor]:
    """(token ids, labels, position ids or None) rows, right-padded to the longest: input_ids, attention_mask (1 on
    real tokens), labels (-100 on padding), and for packed rows position_ids (padding continues from 0 as a sample
    of its own)."""
    length = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    packed = rows[0][2] is not None
    positions = torch.zeros((len(rows), length), dtype=torch.long) if packed else None
    for row, (row_ids, row_labels, row_positions) in enumerate(rows):
        n = len(row_ids)
        ids[row, :n] = torch.from_numpy(np.asarray(row_ids, dtype=np.int64))
        labels[row, :n] = torch.from_numpy(np.asarray(row_labels, dtype=np.int64))
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.from_numpy(np.asarray(row_positions, dtype=np.int64))
            positions[row, n:] = torch.arange(length - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    return batch


def eval_batches(dataset: TokenizedSet, batch_size: int, max_batches: int = 0) -> list[list[int]]:
    """The validation set in order, in batches; all of it unless max_batches > 0."""
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    return batches[:max_batches] if max_batches > 0 else batches
