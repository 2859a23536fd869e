"""Streamed training sources (`streaming = true`): read, tokenised and packed as training goes, never in full.

Each rank reads its own share of a source (every world_size-th row, or whole files of a directory;
datasets.distributed.split_dataset_by_node) in windows of rows: READ_ROWS in the file's order, or
`data.shuffle_window` rows trained in a seeded order. A window is formatted and tokenised at once and its samples go
into seq_len training rows: without data.packing a row is one sample; with it a row takes samples until the next
one does not fit, and that one opens the next row (a sample is never split). `text` documents flow across rows with
EOS between them, as when a text source is tokenised in full. Preference pairs (and KTO examples) are a row each,
tokenised as data/preference.py tokenises them. When a source ends, its next pass starts at its first row. Memory is
a window's worth, whatever the corpus size.

Several streamed sources mix by weight: which source fills a rank's (a shard's, below) n-th row is a seeded draw,
a pure function of (seed, rank, n). So where a rank's stream stands after a step is a small record: per source, its
pass, the datasets iterator's state at the start of the current window, how many of the window's samples were taken
and how many tokens of the next one (text); plus the rank's row counter. The training loop carries it in the train
state and a checkpoint stores it per rank: a resumed run reads the window again, skips what was taken, and trains
on exactly the rows the uninterrupted run would have.

The shares are cut once, for the ranks of the run's first start (its shards), and stay so for the whole run: a run
resumed on another number of ranks reads the same shards, each rank those whose rows of the step fall in its part of
the global batch (RankStream). So each step's global batch is the same rows in the same order on any number of
ranks, and no sample is lost or read twice. (A rank whose part is smaller than a shard's reads the whole shard and
keeps its part: a run that grew tokenises some rows on more than one rank.)"""

import copy
from collections import deque
from typing import Any, Callable, Optional, Sequence

import attrs
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from automodel.config import BatchShape, ConfigError, DataConfig, DataSourceConfig
from automodel.data.batching import collate_rows
from automodel.data import preference as pairs
from automodel.data.formats import FormatOptions
from automodel.data.sources import open_stream
from automodel.data.tokenize import PREFLIGHT_ROWS, document_tokens, encode_examples, format_row, source_label
from automodel.loss import IGNORE_INDEX

READ_ROWS = 256  # rows formatted and tokenised at a time (and the window without data.shuffle_window)

Row = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]  # token ids, labels, position ids (packed) or None


@attrs.frozen
class _Sample:
    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, -100 where masked
    at: dict  # the source's position before it: pass, the state and row count at its window's start, its index


class SourceStream:
    """One streamed source on one rank: tokenised samples (or `text` documents), pass after pass.

    Rows are read in windows (`data.shuffle_window` rows, else READ_ROWS): a window is formatted and tokenised at
    once, and its samples are trained on in a seeded order (shuffled; in order without a shuffle window). A position
    is the window's start (pass, datasets state, rows read) and how many of its samples were taken: resuming reads
    the window again and skips those."""

    def __init__(self, src: DataSourceConfig, data_cfg: DataConfig, options: FormatOptions,
                 tokenizer: PreTrainedTokenizerBase, rank: int = 0, world_size: int = 1,
                 position: Optional[dict] = None, seed: int = 0, index: int = 0):
        self.src, self.data_cfg, self.options, self.tokenizer = src, data_cfg, options, tokenizer
        self.rank, self.world_size, self.seed, self.index = rank, world_size, seed, index
        self.text = src.format == "text"
        self.preference = src.format in pairs.FORMATS  # a sample is a pair (data/preference.py's Sample)
        self.window = data_cfg.shuffle_window or READ_ROWS
        position = position or {"pass": 0, "state": None, "rows_read": 0, "taken": 0, "offset": 0}
        self._queue: deque[_Sample] = deque()
        self._open(int(position["pass"]), position["state"], int(position["rows_read"]))
        if position["taken"]:  # the window is read again; its samples already trained on are skipped
            self._read()
            if len(self._queue) < int(position["taken"]):
                raise ConfigError(f"{src.source}: the checkpoint's stream position is {position['taken']} samples into "
                                  f"a window that now holds {len(self._queue)}: the source changed since it was "
                                  "written; restore it, or start afresh (train.resume = \"never\")")
            for _ in range(int(position["taken"])):
                self._queue.popleft()
        self._offset = int(position["offset"])  # tokens of the head sample already trained on (text only)

    def _open(self, pass_index: int, state: Optional[dict], rows_read: int) -> None:
        self._ds = open_stream(self.src, self.rank, self.world_size)
        if state is not None:
            self._ds.load_state_dict(state)
        self._rows = iter(self._ds)
        # datasets gives the loaded state back only once a row has been read (before that, the start's): until then
        # the position is the state loaded.
        self._loaded, self._started = copy.deepcopy(state), False
        self._pass, self._rows_read = pass_index, rows_read
        self._whole_pass, self._produced = state is None, False  # to tell a source that yields nothing at all

    def position(self) -> dict:
        """Where this source stands: its next token is the first not yet trained on."""
        if self._queue:
            return {**self._queue[0].at, "offset": self._offset}
        return {"pass": self._pass, "state": self._state(), "rows_read": self._rows_read, "taken": 0, "offset": 0}

    def _state(self) -> Optional[dict]:
        """The datasets iterator's state before its next row."""
        return self._ds.state_dict() if self._started else self._loaded

    def _where(self, rows_read: int) -> str:
        share = f" of rank {self.rank}'s share of the rows" if self.world_size > 1 else ""
        return f"row {rows_read}{share}, pass {self._pass + 1}"

    def _read(self) -> None:
        """Reads windows until a sample is queued (a new pass begins where a source ends)."""
        while not self._queue:
            start = {"pass": self._pass, "state": self._state(), "rows_read": self._rows_read}
            rows: list[dict] = []
            while len(rows) < self.window:
                try:
                    rows.append(next(self._rows))
                    self._started = True
                except StopIteration:
                    break
            if not rows:  # the pass has ended
                if self._whole_pass and not self._produced:
                    raise ConfigError(f"{self.src.source}: a whole pass of the stream gave no sample on rank "
                                      f"{self.rank} ({self._rows_read} rows read); check data.seq_len, "
                                      "data.truncate and the source's rows")
                self._open(self._pass + 1, None, 0)
                continue
            samples = []
            for chunk in range(0, len(rows), READ_ROWS):  # Python objects of READ_ROWS rows at a time
                samples += self._tokenise(rows[chunk:chunk + READ_ROWS], start["rows_read"] + chunk)
            self._rows_read += len(rows)
            order = range(len(samples))
            if self.data_cfg.shuffle_window:  # a function of (seed, rank, source, pass, window)
                window = start["rows_read"] // self.window
                key = [self.seed, self.rank, self.index, self._pass, window]
                order = np.random.default_rng(key).permutation(len(samples)).tolist()
            for taken, k in enumerate(order):
                ids, labels = (samples[k], None) if self.preference else samples[k]
                self._queue.append(_Sample(ids, labels, {**start, "taken": taken}))
            self._produced = self._produced or bool(samples)

    def _tokenise(self, rows: list[dict], first: int) -> list:
        """Rows (the first is row `first` of the pass) -> their samples, bad and dropped ones left out (preference
        rows: pairs as data/preference.py makes them; KTO's mismatched rows pair completions within the window)."""
        if self.preference:
            pset = pairs.tokenize_rows(rows, self.src, self.data_cfg, self.tokenizer, self.options, "train",
                                       kto=self.src.format == "kto", where=lambda i: self._where(first + i))
            return pairs.samples_of(pset, range(len(pset)))
        examples = [format_row(self.src, self.options, row, self._where(first + i), self.data_cfg.on_bad_row)
                    for i, row in enumerate(rows)]
        examples = [ex for ex in examples if ex is not None]
        if self.text:
            encoded = [(ids, ids) for ids in document_tokens(examples, self.tokenizer)]
        else:
            encoded = [s[:2] for s in encode_examples(examples, self.tokenizer, self.data_cfg.seq_len,
                                                       self.data_cfg.truncate) if s is not None]
        return [(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))
                for ids, labels in encoded if ids]

    def head(self) -> Any:
        """The next sample's (ids, labels): for a text document, the tokens not yet taken; a preference sample as
        it is."""
        self._read()
        sample = self._queue[0]
        if self.preference:
            return sample.ids
        return sample.ids[self._offset:], sample.labels[self._offset:]

    def take(self, n: Optional[int] = None) -> None:
        """Consumes the head sample, or its next `n` tokens (text)."""
        remaining = len(self._queue[0].ids) - self._offset
        if n is None or n >= remaining:
            self._queue.popleft()
            self._offset = 0
        else:
            self._offset += n


class TrainStream:
    """A rank's training rows from streamed sources, step after step: `next_step()` gives its micro-batches and the
    stream position after them."""

    def __init__(self, sources: Sequence[SourceStream], shares: Sequence[float], data_cfg: DataConfig,
                 shape: BatchShape, seed: int, rank: int, pad_id: int, rows: int = 0,
                 collate: Optional[Callable[[list], dict]] = None):
        self.sources, self.data_cfg, self.shape = list(sources), data_cfg, shape
        self.seed, self.rank, self.pad_id, self.rows = seed, rank, pad_id, rows
        self.collate = collate or (lambda rows: collate_rows(rows, pad_id))
        self.bounds = np.cumsum(shares)[:-1] if len(shares) > 1 else np.zeros(0)

    def position(self) -> dict:
        return {"rows": self.rows, "sources": [s.position() for s in self.sources]}

    def source_of(self, n: int) -> int:
        """Which source fills this rank's n-th row: a seeded draw by the shares."""
        if not len(self.bounds):
            return 0
        u = np.random.default_rng([self.seed, self.rank, n]).random()  # ~30 us a row
        return int(np.searchsorted(self.bounds, u, side="right"))

    def next_row(self) -> Row:
        source = self.sources[self.source_of(self.rows)]
        self.rows += 1
        seq_len, packing = self.data_cfg.seq_len, self.data_cfg.packing
        if source.preference:  # a pair (or KTO example) per row, collated by the recipe's `collate`
            sample = source.head()
            source.take()
            return sample
        if source.text:  # seq_len tokens of the document stream, all trained
            pieces, length = [], 0
            while length < seq_len:
                piece, _ = source.head()
                piece = piece[:seq_len - length]
                pieces.append(piece)
                length += len(piece)
                source.take(len(piece))
            row = np.concatenate(pieces).astype(np.int64)
            return row, row.copy(), np.arange(seq_len, dtype=np.int64) if packing else None
        if not packing:
            ids, labels = source.head()
            source.take()
            return ids.astype(np.int64), labels.astype(np.int64), None
        ids, labels, positions, length = [], [], [], 0
        while seq_len - length >= 2:  # every sample has at least 2 tokens
            sample_ids, sample_labels = source.head()
            if ids and length + len(sample_ids) > seq_len:
                break  # it opens the next row
            sample_labels = sample_labels.astype(np.int64)
            sample_labels[0] = IGNORE_INDEX  # the token before it belongs to another sample
            ids.append(sample_ids)
            labels.append(sample_labels)
            positions.append(np.arange(len(sample_ids), dtype=np.int64))
            length += len(sample_ids)
            source.take()
        return np.concatenate(ids).astype(np.int64), np.concatenate(labels), np.concatenate(positions)

    def next_step(self) -> tuple[list[dict[str, torch.Tensor]], dict]:
        """This rank's micro-batches of the next step, and the position after them."""
        rows = [self.next_row() for _ in range(self.shape.per_rank)]
        m = self.shape.micro_batch_size
        return [self.collate(rows[i:i + m]) for i in range(0, len(rows), m)], self.position()


class RankStream:
    """A rank's part of each step's global batch, from the shards (the first start's ranks) it overlaps: a step takes
    global_batch_size / shards rows from each shard in turn, and this rank keeps rows [rank x per_rank, (rank + 1) x
    per_rank) of them. Its position holds each shard's it reads."""

    def __init__(self, shards: dict[int, TrainStream], count: int, shape: BatchShape, rank: int,
                 collate: Callable[[list], dict]):
        self.shards, self.count, self.shape, self.rank, self.collate = shards, count, shape, rank, collate

    def position(self) -> dict:
        return {"shards": self.count, "positions": {str(v): s.position() for v, s in self.shards.items()}}

    def next_step(self) -> tuple[list[dict[str, torch.Tensor]], dict]:
        """This rank's micro-batches of the next step, and the position after them."""
        per_shard = self.shape.global_batch_size // self.count
        first = self.rank * self.shape.per_rank
        rows = []
        for v, shard in self.shards.items():
            for k in range(per_shard):
                row = shard.next_row()
                if first <= v * per_shard + k < first + self.shape.per_rank:
                    rows.append(row)
        m = self.shape.micro_batch_size
        return [self.collate(rows[i:i + m]) for i in range(0, len(rows), m)], self.position()


def open_rank_stream(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, options: FormatOptions,
                     shape: BatchShape, seed: int, rank: int, position: Optional[dict] = None,
                     collate: Optional[Callable[[list], dict]] = None) -> RankStream:
    """This rank's training rows of the streamed sources of [data], from `position` (a checkpoint's: every shard's,
    see checkpoint.store.load_stream) or from the start, where the shards are this run's ranks."""
    count = position["shards"] if position is not None else shape.world_size
    if shape.global_batch_size % count:  # the global batch is checked unchanged on resume; this cannot happen
        raise ConfigError(f"the checkpoint's stream is cut into {count} shards, which do not divide "
                          f"train.global_batch_size ({shape.global_batch_size})")
    per_shard, first = shape.global_batch_size // count, rank * shape.per_rank
    held = range(first // per_shard, (first + shape.per_rank - 1) // per_shard + 1)
    shard_shape = attrs.evolve(shape, world_size=count)
    collate = collate or (lambda rows: collate_rows(rows, tokenizer.pad_token_id))
    shards = {v: open_train_stream(data_cfg, tokenizer, options, shard_shape, seed, v,
                                   position["positions"][str(v)] if position is not None else None, collate)
              for v in held}
    return RankStream(shards, count, shape, rank, collate)


def first_shard(position: dict) -> dict:
    """The position of the first shard a rank's position holds (the only one, unless the run changed its ranks)."""
    return position["positions"][min(position["positions"], key=int)]


def shares_of(sources: Sequence[DataSourceConfig]) -> list[float]:
    """Each streamed source's share of the rows: its weight normalised (equal without weights: a stream's size is
    not known ahead)."""
    weights = [src.weight if src.weight is not None else 1.0 for src in sources]
    return [w / sum(weights) for w in weights]


def open_train_stream(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, options: FormatOptions,
                      shape: BatchShape, seed: int, rank: int, position: Optional[dict] = None,
                      collate: Optional[Callable[[list], dict]] = None) -> TrainStream:
    """The training sources of [data] streamed on this rank, from `position` (a checkpoint's) or from the start;
    `collate` makes a micro-batch of rows (default: collate_rows; preference pairs: the recipe's)."""
    sources = data_cfg.train
    saved = position["sources"] if position is not None else [None] * len(sources)
    if len(saved) != len(sources):
        raise ConfigError(f"the checkpoint's stream position covers {len(saved)} training sources, this config has "
                          f"{len(sources)}; start afresh (train.resume = \"never\" or another output_dir)")
    # Its own tokenizer: the stream tokenises in the prefetch thread while the loop's thread may use the run's
    # (decoding answers at evaluation, saving it with a checkpoint), and a fast tokenizer is not to be shared so.
    tokenizer = copy.deepcopy(tokenizer)
    options = attrs.evolve(options, tokenizer=tokenizer)
    streams = [SourceStream(src, data_cfg, options, tokenizer, rank, shape.world_size, at, seed, k)
               for k, (src, at) in enumerate(zip(sources, saved))]
    return TrainStream(streams, shares_of(sources), data_cfg, shape, seed, rank, tokenizer.pad_token_id,
                       rows=position["rows"] if position is not None else 0, collate=collate)


def preflight(data_cfg: DataConfig, options: FormatOptions) -> list[str]:
    """Opens every streamed training source and formats its first rows (a missing file, an unknown column or a bad
    row is reported before any weights load); returns the log's line per source."""
    sources = data_cfg.train
    order = (f"shuffled in windows of {data_cfg.shuffle_window:,} rows" if data_cfg.shuffle_window else
             "read in order")
    lines = []
    for src, share in zip(sources, shares_of(sources)):
        first = list(open_stream(src).take(PREFLIGHT_ROWS))
        if src.format in pairs.FORMATS:
            pairs.tokenize_rows(first, src, data_cfg, options.tokenizer, options, "train", kto=src.format == "kto")
        else:
            for i, row in enumerate(first):
                format_row(src, options, row, i, data_cfg.on_bad_row)
        label = "train" if len(sources) == 1 else f"train/{source_label(src)}"
        mix = f"; {100 * share:.1f}% of the rows" if len(sources) > 1 else ""
        lines.append(f"{label}: {src.format} rows streamed from {src.source} (split `{src.split}`"
                     + (f", first {src.limit:,} rows" if src.limit is not None else "")
                     + f"), {order}, tokenised and {'packed' if data_cfg.packing else 'batched'} as training "
                     f"goes; passes repeat{mix}")
    return lines


def passes(position: dict) -> list[int]:
    """The pass (from 1) each source of a stream position (its first shard) is in."""
    return [at["pass"] + 1 for at in first_shard(position)["sources"]]


def resumed_line(position: Any, sources: Sequence[DataSourceConfig]) -> str:
    """The log's line for a stream resumed from a checkpoint (its first shard's position)."""
    shard = first_shard(position)
    parts = [f"{source_label(src) if len(sources) > 1 else 'train'} in pass {at['pass'] + 1}, {at['taken']} samples "
             f"into the window from row {at['rows_read']:,}" for src, at in zip(sources, shard["sources"])]
    return f"stream resumed after {shard['rows']:,} training rows of shard 0: " + "; ".join(parts)
