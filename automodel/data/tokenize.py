"""Examples -> token ids with labels (-100 where masked), cached on disk.

Each segment of an example is tokenised on its own and the pieces are concatenated, so the boundary
between masked and trained text never splits a token. `text` documents are concatenated with EOS
between them and cut into seq_len rows instead.
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs
import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from automodel.config import ConfigError, DataConfig, DataSourceConfig
from automodel.data.formats import FORMATS, BadRow, Example, FormatOptions, TemplateTimeout
from automodel.data.sources import load_rows
from automodel.loss import IGNORE_INDEX
CACHE_VERSION = 1  # bump when tokenisation changes, so old caches are not reused


@attrs.frozen
class TokenizedSet:
    """A tokenised split. Row i: `input_ids[i]`, `labels[i]` (same length, -100 where masked),
    `prompt_lens[i]` (tokens before the last trained span: the final answer's prompt) and `references[i]` (answers for exact match).
    Packed sets also carry `position_ids` (restarting at 0 for each sample in a row)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lens: list[int]
    references: list[tuple[str, ...]]
    name: str
    rows_read: int
    dropped: int  # longer than seq_len with truncate = "drop", or no trained token left
    truncated: int
    skipped: int = 0  # bad rows with on_bad_row = "skip"
    position_ids: Optional[list[list[int]]] = None
    samples: int = 0  # samples in it (several per row when packed); 0 means one per row

    def __len__(self) -> int:
        return len(self.input_ids)

    def summary(self) -> str:
        tokens = sum(map(len, self.input_ids))
        trained = sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in self.labels)
        packed = f" packed into {len(self):,} rows" if self.position_ids is not None else ""
        skipped = f", {self.skipped:,} bad rows skipped" if self.skipped else ""
        return (f"{self.name}: {self.samples or len(self):,} samples{packed} from {self.rows_read:,} rows "
                f"({self.dropped:,} dropped, {self.truncated:,} truncated{skipped}), {tokens:,} tokens, "
                f"{trained:,} trained")


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                      truncate: str, name: str, chunk_documents: bool = False) -> TokenizedSet:
    texts = [text for ex in examples for text, _ in ex.segments]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    specials = tokenizer("", add_special_tokens=True)["input_ids"]  # e.g. [BOS], or nothing
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chunk_documents:
        stream: list[int] = []
        for ex in examples:
            for _ in ex.segments:
                stream += next(pieces)
            stream += eos
        rows = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
        rows = [r for r in rows if len(r) >= 2]
        return TokenizedSet(rows, [list(r) for r in rows], [0] * len(rows), [()] * len(rows), name, len(examples),
                            0, 0)
    out_ids, out_labels, out_prompt_lens, out_refs = [], [], [], []
    dropped = truncated = 0
    for ex in examples:
        ids = list(specials) if ex.add_special_tokens else []
        labels = [IGNORE_INDEX] * len(ids)
        last_trained = False
        for _, trained in ex.segments:
            piece = next(pieces)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
            last_trained = trained
        if ex.add_eos and eos:
            ids += eos
            labels += eos if last_trained else [IGNORE_INDEX]
        cut = len(ids) > seq_len
        if cut and truncate == "drop":
            dropped += 1
            continue
        ids, labels = ids[:seq_len], labels[:seq_len]
        # Labels are shifted by one in the loss, so position 0 never counts.
        if all(t == IGNORE_INDEX for t in labels[1:]):
            dropped += 1
            continue
        truncated += cut
        out_ids.append(ids)
        out_labels.append(labels)
        out_prompt_lens.append(_last_span_start(labels))
        out_refs.append(ex.references)
    return TokenizedSet(out_ids, out_labels, out_prompt_lens, out_refs, name, len(examples), dropped, truncated)


def _last_span_start(labels: list[int]) -> int:
    """Where the last run of trained labels starts: the prompt for exact match ends there (for a multi-turn
    chat, before the final answer, which is the reference)."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def load_examples(src: DataSourceConfig, options: FormatOptions, rows: Optional[datasets.Dataset] = None,
                  on_bad_row: str = "error") -> tuple[list[Example], int]:
    """(examples, bad rows skipped). A bad row is an error naming the file, row and field, unless skipped."""
    fmt = FORMATS[src.format]
    rows = load_rows(src) if rows is None else rows
    examples, skipped = [], 0
    for i in range(len(rows)):
        try:
            row = rows[i]
        except UnicodeDecodeError as e:  # datasets decodes text lazily, row by row
            raise ConfigError(f"{src.source}: row {i} (split `{src.split}`) is not UTF-8 text ({e.reason} at byte "
                              f"{e.start}); re-encode the file as UTF-8") from None
        try:
            examples.append(fmt(row, src.columns, options))
        except BadRow as e:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise ConfigError(f"{src.source}: row {i} (split `{src.split}`), field `{e.field}`: {e}; fix the row or "
                              f"set data.on_bad_row = \"skip\"") from None
        except TemplateTimeout as e:
            raise ConfigError(f"data.chat_template: {src.source} row {i}: {e}; the template loops without end, or "
                              "nearly: fix it, or use \"chatml\"") from None
    return examples, skipped


# ---------------------------------------------------------------------------------------------
# The cache: one .npz per (source, split, format options, tokenizer, seq_len), written by rank 0


def cache_root(data_cfg: DataConfig) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir)
    return Path(os.environ.get("AUTOMODEL_CACHE", Path.home() / ".cache" / "automodel")) / "tokenized"


def _source_identity(source: str) -> Any:
    path = Path(source)
    if path.exists():  # a local file: its content is identified by path, size and modification time
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return source


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = json.dumps([tokenizer.eos_token_id, tokenizer("", add_special_tokens=True)["input_ids"],
                        getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256((vocab + extra).encode()).hexdigest()


def cache_key(src: DataSourceConfig, data_cfg: DataConfig, tokenizer_id: str, carve: Any) -> str:
    parts = [CACHE_VERSION, _source_identity(src.source), src.split, src.limit, src.format, sorted(src.columns.items()),
             data_cfg.seq_len, data_cfg.truncate, data_cfg.prompt_template, data_cfg.chat_template, data_cfg.train_on,
             data_cfg.on_bad_row, carve, tokenizer_id]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def save_set(tset: TokenizedSet, path: Path) -> None:
    lengths = np.array([len(x) for x in tset.input_ids], dtype=np.int64)
    flat = lambda rows: np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))  # noqa
    meta = {"name": tset.name, "rows_read": tset.rows_read, "dropped": tset.dropped, "truncated": tset.truncated,
            "skipped": tset.skipped, "references": [list(r) for r in tset.references]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, lengths=lengths, input_ids=flat(tset.input_ids), labels=flat(tset.labels),
             prompt_lens=np.array(tset.prompt_lens, dtype=np.int64), meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def load_set(path: Path) -> TokenizedSet:
    with np.load(path) as z:
        bounds = np.concatenate([[0], np.cumsum(z["lengths"])])
        ids, labels = z["input_ids"].tolist(), z["labels"].tolist()
        meta = json.loads(str(z["meta"]))
        prompt_lens = z["prompt_lens"].tolist()
    split = lambda flat: [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]  # noqa: E731
    return TokenizedSet(split(ids), split(labels), prompt_lens, [tuple(r) for r in meta["references"]], meta["name"],
                        meta["rows_read"], meta["dropped"], meta["truncated"], meta["skipped"])


def build(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, rank: int = 0,
          use_cache: bool = True, log=None) -> tuple[TokenizedSet, Optional[TokenizedSet]]:
    """The tokenised train and validation sets that [data] describes. With several ranks, rank 0
    tokenises and writes the cache while the others wait, then read it."""
    from automodel.distributed import barrier

    options = FormatOptions(prompt_template=data_cfg.prompt_template, chat_template=data_cfg.chat_template,
                            train_on=data_cfg.train_on, tokenizer=tokenizer)
    plan = [("train", data_cfg.train, None)]
    if data_cfg.validation is not None:
        plan.append(("validation", data_cfg.validation, None))
    elif data_cfg.validation_fraction > 0:
        plan = [("train", data_cfg.train, ("train", data_cfg.validation_fraction, seed)),
                ("validation", data_cfg.train, ("test", data_cfg.validation_fraction, seed))]
    sets: dict[str, TokenizedSet] = {}
    tokenizer_id = _tokenizer_identity(tokenizer) if use_cache else ""  # hashes the whole vocabulary: once
    for name, src, carve in plan:
        path = cache_root(data_cfg) / f"{name}-{cache_key(src, data_cfg, tokenizer_id, carve)}.npz"
        if use_cache and rank == 0:
            cached = path.is_file()
            if not cached:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_set(_tokenize_split(name, src, carve, data_cfg, tokenizer, options, log, rank), path)
            if log is not None:
                log(f"data: {name} {'read from' if cached else 'written to'} the tokenisation cache, {path} "
                    "(data.cache_dir or $AUTOMODEL_CACHE moves it)")
        if use_cache:
            barrier()
            sets[name] = load_set(path)
        else:
            sets[name] = _tokenize_split(name, src, carve, data_cfg, tokenizer, options, log, rank)
        if len(sets[name]) == 0:
            raise ConfigError(f"{src.source}: no {name} samples left: {sets[name].summary()}; raise data.seq_len "
                              f"(now {data_cfg.seq_len}) or set data.truncate = \"right\"")
    return sets["train"], sets.get("validation")


def _tokenize_split(name: str, src: DataSourceConfig, carve: Any, data_cfg: DataConfig,
                    tokenizer: PreTrainedTokenizerBase, options: FormatOptions, log, rank: int) -> TokenizedSet:
    started = time.perf_counter()
    rows = load_rows(src)
    if carve is not None:
        side, fraction, seed = carve
        rows = rows.train_test_split(test_size=fraction, seed=seed, shuffle=True)[side]
    examples, skipped = load_examples(src, options, rows, data_cfg.on_bad_row)
    tset = tokenize_examples(examples, tokenizer, data_cfg.seq_len, data_cfg.truncate, name,
                             chunk_documents=src.format == "text")
    tset = attrs.evolve(tset, rows_read=len(rows), skipped=skipped)
    if log is not None:
        seconds = time.perf_counter() - started
        log(f"data: rank {rank} tokenised {name} ({len(rows):,} rows) in {seconds:.1f}s, "
            f"{sum(map(len, tset.input_ids)) / max(seconds, 1e-9):,.0f} tokens/s")
    return tset
