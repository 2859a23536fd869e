"""The token store: a tokenised split as flat arrays, memory-mapped from the tokenisation cache.

One split is a directory: `input_ids.npy` (int32, every row's tokens end to end), `trained.npy` (uint8: 1 where the
token is a target, so labels are the token or -100), `offsets.npy` (int64, rows + 1 entries), `prompt_lens.npy`,
`references.json` (answers for exact match, read only if asked for) and `meta.json` (counts; written last). Rank 0 writes it once; every rank maps it read-only, so the
tokens are pages of the page cache shared by the ranks of a node, not Python lists on each (5 bytes a token instead
of tens). Rows read as lists of ints (`rows[i]`) or arrays (`rows.array(i)`); packed sets are views that reference
their samples, never copies (`Packed`).
"""

import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from automodel.loss import IGNORE_INDEX


class _RowAccess:
    """Rows read as lists of ints (`rows[i]`, slices, iteration, equality) through the subclass's `array(i)`."""

    def __getitem__(self, i: Union[int, slice]):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.array(i).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))


class Rows(_RowAccess):
    """Rows of token ids (or of labels, with `trained`: the token where trained, else -100) in one flat array."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, trained: Optional[np.ndarray] = None):
        self.flat, self.offsets, self.trained = flat, offsets, trained

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> "Rows":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def labels_of(cls, ids: "Rows", labels: Sequence[Sequence[int]]) -> "Rows":
        """Label rows over `ids`' tokens: each label is its token or -100 (what tokenisation produces)."""
        flat = np.fromiter((t for r in labels for t in r), dtype=np.int64, count=int(ids.offsets[-1]))
        trained = flat != IGNORE_INDEX
        if not np.array_equal(flat[trained], ids.flat[trained]):
            raise ValueError("a trained label differs from its token")
        return cls(ids.flat, ids.offsets, trained.astype(np.uint8))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def array(self, i: int) -> np.ndarray:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.flat[a:b].astype(np.int64)
        if self.trained is None:
            return ids
        return np.where(self.trained[a:b].astype(bool), ids, IGNORE_INDEX)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def count_trained(self) -> int:
        return int(self.trained.sum()) if self.trained is not None else int(self.offsets[-1])


def concat(parts: Sequence[Rows]) -> Rows:
    """The rows of `parts` in order, one flat array (labels keep their trained flags)."""
    if not parts:
        return Rows(np.zeros(0, np.int32), np.zeros(1, np.int64))
    sizes = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
    offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, sizes)])
    flat = np.concatenate([p.flat[:int(p.offsets[-1])] for p in parts]).astype(np.int32)
    if all(p.trained is None for p in parts):
        return Rows(flat, offsets.astype(np.int64))
    trained = np.concatenate([p.trained if p.trained is not None else np.ones(int(p.offsets[-1]), np.uint8)
                              for p in parts])
    return Rows(flat, offsets.astype(np.int64), trained)


class Packed(_RowAccess):
    """Packed rows as a view: row r is the samples `members[row_offsets[r]:row_offsets[r + 1]]` of `base` end to
    end. kind "ids": their tokens; "labels": their labels with each sample's first masked (the token before it
    belongs to another sample); "positions": 0, 1, ... within each sample."""

    def __init__(self, base: Rows, members: np.ndarray, row_offsets: np.ndarray, kind: str):
        self.base, self.members, self.row_offsets, self.kind = base, members, row_offsets, kind

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def samples(self, r: int) -> np.ndarray:
        return self.members[self.row_offsets[r]:self.row_offsets[r + 1]]

    def array(self, r: int) -> np.ndarray:
        pieces = []
        for j in self.samples(r):
            if self.kind == "positions":
                pieces.append(np.arange(int(self.base.offsets[j + 1] - self.base.offsets[j]), dtype=np.int64))
            else:
                piece = self.base.array(int(j))
                if self.kind == "labels":
                    piece[0] = IGNORE_INDEX
                pieces.append(piece)
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def lengths(self) -> np.ndarray:
        sample_lengths = self.base.lengths()[self.members]
        return np.add.reduceat(sample_lengths, self.row_offsets[:-1]) if len(self) else np.zeros(0, np.int64)

    def count_trained(self) -> int:
        """Trained labels: each member sample's, less its first token's (masked in a packed row)."""
        starts = self.base.offsets[:-1]
        if self.base.trained is None:
            per_sample, first = self.base.lengths(), np.ones(len(starts), np.int64)
        else:
            trained = np.asarray(self.base.trained, dtype=np.int64)
            per_sample = np.add.reduceat(trained, starts) if len(starts) else np.zeros(0, np.int64)
            first = trained[starts]
        return int((per_sample - first)[self.members].sum())


class LazyReferences:
    """references.json, read on first use (only exact match reads it: a training set's answers stay on disk)."""

    def __init__(self, path: Path):
        self.path = path
        self._rows: Optional[list] = None

    def _load(self) -> list:
        if self._rows is None:
            self._rows = [tuple(r) for r in json.loads(self.path.read_text())]
        return self._rows

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, i):
        return self._load()[i]

    def __iter__(self):
        return iter(self._load())

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def write(path: Path, ids: Rows, labels: Rows, prompt_lens: Sequence[int], references: Sequence[Sequence[str]],
          meta: dict) -> None:
    """The split's directory, complete or not at all: written beside `path`, then renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = int(ids.offsets[-1])
    trained = labels.trained[:n] if labels.trained is not None else np.ones(n, np.uint8)
    np.save(tmp / "input_ids.npy", np.ascontiguousarray(ids.flat[:n], dtype=np.int32))
    np.save(tmp / "trained.npy", np.ascontiguousarray(trained, dtype=np.uint8))
    np.save(tmp / "offsets.npy", np.ascontiguousarray(ids.offsets, dtype=np.int64))
    np.save(tmp / "prompt_lens.npy", np.asarray(prompt_lens, dtype=np.int64))
    (tmp / "references.json").write_text(json.dumps([list(r) for r in references]))
    (tmp / "meta.json").write_text(json.dumps(meta))  # last: its presence marks a complete split
    if path.exists():  # another writer finished first: same content (same key)
        shutil.rmtree(tmp)
        return
    os.replace(tmp, path)


def read(path: Path) -> tuple[Rows, Rows, np.ndarray, LazyReferences, dict]:
    """(ids, labels, prompt lengths, references, meta), the token arrays memory-mapped read-only."""
    ids = np.load(path / "input_ids.npy", mmap_mode="r")
    trained = np.load(path / "trained.npy", mmap_mode="r")
    offsets = np.load(path / "offsets.npy")
    return (Rows(ids, offsets), Rows(ids, offsets, trained), np.load(path / "prompt_lens.npy"),
            LazyReferences(path / "references.json"), json.loads((path / "meta.json").read_text()))
