"""Several training sources as one set, and how often each is drawn.

`chain` puts the sources' sets end to end without copying a token (row i dispatches to its source). `Mixture` says
which of those rows an epoch holds when the sources carry weights: each source contributes its share of the epoch
(share = weight / sum of weights; an epoch is as long as all sources together), drawn from a fresh seeded
permutation of that source, repeated when the share exceeds its size; then the epoch is shuffled. Every draw is a
function of (seed, epoch) alone, so step s's batch is computed directly, on any rank, after any resume.
"""

import functools
from typing import Any, Iterator, Optional, Sequence, Union

import attrs
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from automodel.config import DataConfig
from automodel.data.tokenize import TokenizedSet, build_sources


class Chain:
    """The rows of several row sequences (Rows, Packed, Chain) end to end."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _where(self, i: int) -> tuple[Any, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k], i - int(self.starts[k])

    def array(self, i: int) -> np.ndarray:
        part, j = self._where(i)
        return part.array(j) if hasattr(part, "array") else np.asarray(part[j])

    def __getitem__(self, i: Union[int, slice]):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        part, j = self._where(i)
        return part[j]

    def __iter__(self) -> Iterator:
        return (x for part in self.parts for x in part)

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths() for p in self.parts])

    def count_trained(self) -> int:
        return sum(p.count_trained() for p in self.parts)


def chain(sets: Sequence[TokenizedSet], name: str) -> TokenizedSet:
    """One set whose rows are the sets' rows in order (all packed, or none)."""
    if len(sets) == 1:
        return sets[0]
    packed = [s.position_ids is not None for s in sets]
    if any(packed) and not all(packed):
        raise ValueError("chain: pack every source or none")
    return TokenizedSet(
        Chain([s.input_ids for s in sets]), Chain([s.labels for s in sets]),
        Chain([s.prompt_lens for s in sets]), Chain([s.references for s in sets]), name,
        sum(s.rows_read for s in sets), sum(s.dropped for s in sets), sum(s.truncated for s in sets),
        sum(s.skipped for s in sets), position_ids=Chain([s.position_ids for s in sets]) if all(packed) else None,
        samples=sum(s.samples or len(s) for s in sets))


@attrs.frozen
class Mixture:
    """Weighted draws over chained sources of `sizes` rows; `shares` sum to 1."""

    sizes: tuple[int, ...]
    shares: tuple[float, ...]
    seed: int = 0

    @classmethod
    def of(cls, sizes: Sequence[int], weights: Sequence[float], seed: int) -> "Mixture":
        total = float(sum(weights))
        return cls(tuple(int(n) for n in sizes), tuple(w / total for w in weights), seed)

    @property
    def epoch_length(self) -> int:
        return sum(self.sizes)

    def counts(self) -> list[int]:
        """Rows of each source per epoch: share x epoch length, rounded by largest remainder (they sum exactly)."""
        exact = [share * self.epoch_length for share in self.shares]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
        for k in by_remainder[:self.epoch_length - sum(counts)]:
            counts[k] += 1
        return counts

    def epoch(self, epoch: int) -> list[int]:
        return _epoch(self, epoch)


@functools.lru_cache(maxsize=2)
def _epoch(mixture: Mixture, epoch: int) -> list[int]:
    starts = np.cumsum([0] + list(mixture.sizes))
    picks = []
    for k, (size, count) in enumerate(zip(mixture.sizes, mixture.counts())):
        passes, drawn = 0, []
        while sum(map(len, drawn)) < count:
            gen = torch.Generator().manual_seed(((mixture.seed * 1_000_003 + epoch) * 1_009 + k) * 1_013 + passes)
            drawn.append(torch.randperm(size, generator=gen))
            passes += 1
        picks.append(torch.cat(drawn)[:count] + int(starts[k]) if drawn else torch.zeros(0, dtype=torch.long))
    rows = torch.cat(picks)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(mixture.seed * 1_000_003 + epoch))
    return rows[order].tolist()


def source_lines(sets: Sequence[TokenizedSet], mixture: "Mixture | None") -> list[str]:
    """The log's line per training source: its summary and, with several, its share of each epoch."""
    if len(sets) == 1:
        return [sets[0].summary()]
    total = sum(len(s) for s in sets)
    counts = mixture.counts() if mixture is not None else [len(s) for s in sets]
    lines = []
    for tset, count in zip(sets, counts):
        unit = "rows" if tset.position_ids is not None else "samples"
        how = (f"{count / len(tset):.2f}x its {unit}" if mixture is not None else "each once")
        lines.append(f"{tset.summary()}; {100 * count / total:.1f}% of each epoch's {total:,} {unit} ({how})")
    return lines


def build(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, rank: int = 0,
          use_cache: bool = True, log=None) -> tuple[TokenizedSet, Optional[TokenizedSet]]:
    """The training sources chained into one set (unweighted), and the first validation set (or None)."""
    train, validation = build_sources(data_cfg, tokenizer, seed, rank, use_cache, log)
    return chain(train, "train"), (validation[0] if validation else None)
