"""Examples -> token ids with labels (-100 where masked), cached on disk.

Each segment of an example is tokenised on its own and the pieces are concatenated, so the boundary
between masked and trained text never splits a token. `text` documents are concatenated with EOS
between them and cut into seq_len rows instead.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import attrs
import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from automodel.config import ConfigError, DataConfig, DataSourceConfig
from automodel.data.formats import FORMATS, BadRow, Example, FormatOptions, TemplateTimeout
from automodel.data.sources import load_rows
from automodel.data.token_store import Rows, concat
from automodel.data import token_store as store
from automodel.loss import IGNORE_INDEX
from automodel.storage import automodel_cache
CACHE_VERSION = 3  # bump when tokenisation or the stored layout changes, so old caches are not reused


@attrs.frozen
class TokenizedSet:
    """A tokenised split. Row i: `input_ids[i]`, `labels[i]` (same length, -100 where masked; lists of ints, or
    `.array(i)`), `prompt_lens[i]` (tokens before the last trained span: the final answer's prompt) and
    `references[i]` (answers for exact match). The rows live in flat arrays (data/token_store.py), memory-mapped when read
    from the cache. Packed sets also carry `position_ids` (restarting at 0 for each sample in a row)."""

    input_ids: Any  # Rows, or a Packed view
    labels: Any
    prompt_lens: Sequence[int]
    references: Sequence[tuple[str, ...]]
    name: str
    rows_read: int
    dropped: int  # longer than seq_len with truncate = "drop", or no trained token left
    truncated: int
    skipped: int = 0  # bad rows with on_bad_row = "skip"
    position_ids: Any = None
    samples: int = 0  # samples in it (several per row when packed); 0 means one per row

    def __len__(self) -> int:
        return len(self.input_ids)

    def summary(self) -> str:
        tokens = int(self.input_ids.lengths().sum())
        trained = self.labels.count_trained()
        packed = f" packed into {len(self):,} rows" if self.position_ids is not None else ""
        skipped = f", {self.skipped:,} bad rows skipped" if self.skipped else ""
        warning = ""
        if self.dropped > 0.01 * self.rows_read:  # more than 1%: say so where it is read, with the key to change
            warning = (f"; warning: {100 * self.dropped / self.rows_read:.1f}% of the rows were dropped (longer than "
                       "data.seq_len, or nothing left to train): raise data.seq_len, or set data.truncate = \"right\"")
        return (f"{self.name}: {self.samples or len(self):,} samples{packed} from {self.rows_read:,} rows "
                f"({self.dropped:,} dropped, {self.truncated:,} truncated{skipped}), {tokens:,} tokens, "
                f"{trained:,} trained{warning}")


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                      truncate: str, name: str, chunk_documents: bool = False) -> TokenizedSet:
    if chunk_documents:
        return chunk_stream(document_stream(examples, tokenizer), seq_len, name, len(examples))
    out_ids, out_labels, out_prompt_lens, out_refs = [], [], [], []
    dropped = truncated = 0
    for ex, sample in zip(examples, encode_examples(examples, tokenizer, seq_len, truncate)):
        if sample is None:
            dropped += 1
            continue
        ids, labels, cut = sample
        truncated += cut
        out_ids.append(ids)
        out_labels.append(labels)
        out_prompt_lens.append(_last_span_start(labels))
        out_refs.append(ex.references)
    ids = Rows.from_lists(out_ids)
    return TokenizedSet(ids, Rows.labels_of(ids, out_labels), out_prompt_lens, out_refs, name, len(examples), dropped,
                        truncated)


def encode_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                    truncate: str) -> Iterator[Optional[tuple[list[int], list[int], bool]]]:
    """Per example: (token ids, labels, whether it was cut to seq_len), or None when it is dropped (longer than
    seq_len with truncate = "drop", or no trained label left). The segments are tokenised in one batch."""
    texts = [text for ex in examples for text, _ in ex.segments]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    specials = tokenizer("", add_special_tokens=True)["input_ids"]  # e.g. [BOS], or nothing
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
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
            yield None
            continue
        ids, labels = ids[:seq_len], labels[:seq_len]
        # Labels are shifted by one in the loss, so position 0 never counts.
        if all(t == IGNORE_INDEX for t in labels[1:]):
            yield None
            continue
        yield ids, labels, cut


def document_stream(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`text` documents as one token stream, EOS after each."""
    return [t for doc in document_tokens(examples, tokenizer) for t in doc]


def document_tokens(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each `text` document's tokens, EOS last."""
    texts = [text for ex in examples for text, _ in ex.segments]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs = []
    for ex in examples:
        doc: list[int] = []
        for _ in ex.segments:
            doc += next(pieces)
        docs.append(doc + eos)
    return docs


def chunk_stream(stream: Sequence[int], seq_len: int, name: str, rows_read: int) -> TokenizedSet:
    """A token stream cut into seq_len rows (all trained); a last row shorter than 2 tokens is left out."""
    tokens = np.asarray(stream, dtype=np.int32)
    if len(tokens) % seq_len == 1:  # a last row shorter than 2 tokens trains nothing
        tokens = tokens[:-1]
    offsets = np.append(np.arange(0, len(tokens), seq_len, dtype=np.int64), len(tokens))
    n = len(offsets) - 1
    return TokenizedSet(Rows(tokens, offsets), Rows(tokens, offsets, np.ones(len(tokens), np.uint8)), [0] * n,
                        [()] * n, name, rows_read, 0, 0)


def _last_span_start(labels: list[int]) -> int:
    """Where the last run of trained labels starts: the prompt for exact match ends there (for a multi-turn
    chat, before the final answer, which is the reference)."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def load_examples(src: DataSourceConfig, options: FormatOptions, rows: Optional[datasets.Dataset] = None,
                  on_bad_row: str = "error", span: Optional[tuple[int, int]] = None) -> tuple[list[Example], int]:
    """(examples, bad rows skipped), of rows [start, stop) with `span`. A bad row is an error naming the file, row
    and field, unless skipped."""
    rows = load_rows(src, on_bad_row) if rows is None else rows
    examples, skipped = [], 0
    for i in range(*(span or (0, len(rows)))):
        try:
            row = rows[i]
        except UnicodeDecodeError as e:  # datasets decodes text lazily, row by row
            raise ConfigError(f"{src.source}: {row_where(src, i)} (split `{src.split}`) is not UTF-8 text ({e.reason} "
                              f"at byte {e.start}); re-encode the file as UTF-8") from None
        example = format_row(src, options, row, i, on_bad_row)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


def row_where(src: DataSourceConfig, index: int) -> str:
    """Where row `index` (0-based, of its split) is, as a person finds it: "line N" (1-based, as an editor shows) in a
    whole local .jsonl or .txt file, else "row N" (0-based, as the file's list or the split's slice counts)."""
    path = Path(src.source)
    if src.split == "train" and path.suffix in (".jsonl", ".txt") and path.is_file():
        with open(path, "rb") as f:
            if path.suffix == ".txt":  # every line is a row
                return f"line {index + 1}"
            seen = -1
            for number, line in enumerate(f, start=1):  # JSON Lines skips blank lines
                seen += bool(line.strip())
                if seen == index:
                    return f"line {number}"
    return f"row {index}"


def _named(src: DataSourceConfig, where: Any) -> str:
    return row_where(src, where) if isinstance(where, int) else where


def format_row(src: DataSourceConfig, options: FormatOptions, row: dict, where: Any,
               on_bad_row: str = "error") -> Optional[Example]:
    """`row` as its format's Example; None for a bad row with on_bad_row = "skip", else an error naming the source,
    `where` (a row index, or a phrase such as "row 12 of the stream") and the field."""
    try:
        return FORMATS[src.format](row, src.columns, options)
    except BadRow as e:
        if on_bad_row == "skip":
            return None
        raise ConfigError(f"{src.source}: {_named(src, where)} (split `{src.split}`), field `{e.field}`: {e}; fix the "
                          f"row or set data.on_bad_row = \"skip\"") from None
    except TemplateTimeout as e:
        where = _named(src, where)
        raise ConfigError(f"data.chat_template: {src.source} {where}: {e}; the template loops without end, or "
                          "nearly: fix it, or use \"chatml\"") from None


# ---------------------------------------------------------------------------------------------
# The cache: one .npz per (source, split, format options, tokenizer, seq_len), written by rank 0


def cache_root(data_cfg: DataConfig) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir)
    return automodel_cache() / "tokenized"


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
             data_cfg.on_bad_row, carve, tokenizer_id] + ([sorted(data_cfg.role_map.items())] if data_cfg.role_map else [])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def save_set(tset: TokenizedSet, path: Path) -> None:
    meta = {"name": tset.name, "rows_read": tset.rows_read, "dropped": tset.dropped, "truncated": tset.truncated,
            "skipped": tset.skipped}
    store.write(path, tset.input_ids, tset.labels, tset.prompt_lens, tset.references, meta)


def load_set(path: Path) -> TokenizedSet:
    ids, labels, prompt_lens, references, meta = store.read(path)
    return TokenizedSet(ids, labels, prompt_lens, references, meta["name"],
                        meta["rows_read"], meta["dropped"], meta["truncated"], meta["skipped"])


def source_label(src: DataSourceConfig) -> str:
    """What the log calls a source: its `name`, else the file's stem or the dataset id."""
    if src.name:
        return src.name
    path = Path(src.source)
    return path.stem if path.suffix else src.source


def build_sources(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, rank: int = 0,
                  use_cache: bool = True, log=None) -> tuple[list[TokenizedSet], list[TokenizedSet]]:
    """(the training sources' sets, the validation sets) that [data] describes, in config order. A lone source is
    called "train" (or "validation"); several are "train/<label>". Streamed training sources are not built here
    (data/stream.py reads them as training goes): their list is empty. With several ranks, rank 0 tokenises and
    writes the cache while the others wait, then read it."""
    from automodel.distributed import barrier

    options = format_options(data_cfg, tokenizer)
    plan = split_plan(data_cfg, seed)
    train, validation = [], []
    tokenizer_id = _tokenizer_identity(tokenizer) if use_cache else ""  # hashes the whole vocabulary: once
    paths = [cache_root(data_cfg) / f"{name.replace('/', '--')}-{cache_key(src, data_cfg, tokenizer_id, carve)}"
             for name, src, carve in plan]
    # Every source that will be tokenised is opened, and its first rows formatted, before any is tokenised; its
    # rows (memory-mapped Arrow) are kept for the tokenising.
    opened = {k: _preflight(src, data_cfg, options) for k, ((name, src, carve), path) in enumerate(zip(plan, paths))
              if rank == 0 and not (use_cache and (path / "meta.json").is_file())}
    for k, ((name, src, carve), path) in enumerate(zip(plan, paths)):
        if use_cache and rank == 0:
            cached = (path / "meta.json").is_file()
            if not cached:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_set(_tokenize_split(name, src, carve, data_cfg, tokenizer, options, log, rank, opened.get(k)),
                         path)
            if log is not None:
                log(f"data: {name} {'read from' if cached else 'written to'} the tokenisation cache, {path} "
                    "(data.cache_dir or $AUTOMODEL_CACHE moves it)")
        if use_cache:
            barrier()
            tset = load_set(path)
        else:
            tset = _tokenize_split(name, src, carve, data_cfg, tokenizer, options, log, rank, opened.get(k))
        if len(tset) == 0:
            raise ConfigError(f"{src.source}: no {name} samples left: {tset.summary()}; raise data.seq_len "
                              f"(now {data_cfg.seq_len}) or set data.truncate = \"right\"")
        (train if name.startswith("train") else validation).append(tset)
    return train, validation


def split_plan(data_cfg: DataConfig, seed: int) -> list[tuple[str, DataSourceConfig, Any]]:
    """(name, source, carve) of each set to build from [data], in config order: a lone source is "train" (or
    "validation"), several "train/<label>"; streamed training sources are left out (data/stream.py reads them);
    with data.validation_fraction each training source is carved into its training and its validation set
    (`carved`)."""
    def named(kind: str, sources: list[DataSourceConfig], carve: Any = None) -> list[tuple[str, DataSourceConfig, Any]]:
        return [(kind if len(sources) == 1 else f"{kind}/{source_label(src)}", src, carve) for src in sources]

    if not data_cfg.validation and data_cfg.validation_fraction > 0:
        fraction = data_cfg.validation_fraction
        return (named("train", data_cfg.train, ("train", fraction, seed))
                + named("validation", data_cfg.train, ("test", fraction, seed)))
    streamed = any(src.streaming for src in data_cfg.train)
    return named("train", [] if streamed else data_cfg.train) + named("validation", data_cfg.validation)


def validation_names(data_cfg: DataConfig) -> list[str]:
    """What each validation set's metrics are called (eval_loss/<name>), in split_plan's order: the label after
    "validation/", or "" for a lone set."""
    return [name.partition("/")[2] for name, _, _ in split_plan(data_cfg, seed=0) if name.split("/")[0] == "validation"]


def carved(rows: datasets.Dataset, carve: Any) -> datasets.Dataset:
    """The rows a split_plan entry's carve keeps (a seeded train/test split of the source), or all of them."""
    if carve is None:
        return rows
    side, fraction, seed = carve
    return rows.train_test_split(test_size=fraction, seed=seed, shuffle=True)[side]


PREFLIGHT_ROWS = 16


def format_options(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> FormatOptions:
    return FormatOptions(prompt_template=data_cfg.prompt_template, chat_template=data_cfg.chat_template,
                         train_on=data_cfg.train_on, tokenizer=tokenizer, role_map=data_cfg.role_map)


def _preflight(src: DataSourceConfig, data_cfg: DataConfig, options: FormatOptions) -> datasets.Dataset:
    """`src`'s rows, its first ones formatted: a missing file, an unknown column or a malformed row is reported
    before hours go into tokenising another source (or loading weights)."""
    rows = load_rows(src, data_cfg.on_bad_row)
    load_examples(src, options, rows, data_cfg.on_bad_row, span=(0, min(len(rows), PREFLIGHT_ROWS)))
    return rows


def _tokenize_split(name: str, src: DataSourceConfig, carve: Any, data_cfg: DataConfig,
                    tokenizer: PreTrainedTokenizerBase, options: FormatOptions, log, rank: int,
                    rows: Optional[datasets.Dataset] = None) -> TokenizedSet:
    """`rows`: the source as already opened (else it is opened here)."""
    started = time.perf_counter()
    rows = carved(load_rows(src, data_cfg.on_bad_row) if rows is None else rows, carve)
    text = src.format == "text"
    job = _Job(src, rows, options, data_cfg, tokenizer, text)
    workers = min(num_proc(data_cfg), max(1, len(rows) // ROWS_PER_CHUNK))
    spans = _spans(len(rows), workers)
    parts: list = [None] * len(spans)
    done_rows = 0

    def progress(k: int) -> None:
        nonlocal done_rows
        done_rows += spans[k][1] - spans[k][0]
        if log is not None and done_rows < len(rows):
            log(f"data: tokenising {name}: {done_rows:,}/{len(rows):,} rows ({100 * done_rows / len(rows):.0f}%, "
                f"{time.perf_counter() - started:.0f}s)")

    if workers == 1:
        for k, span in enumerate(spans):  # span by span: each becomes flat arrays before the next is formatted
            parts[k] = job(span)
            progress(k)
    else:
        # Forked workers inherit the rows (memory-mapped Arrow), the tokenizer and the options; each takes a
        # contiguous span of rows and the parts are joined in order, so the result is the one worker's, exactly.
        # The workers tokenise one batch at a time themselves: the tokenizers library's own threads stay off there.
        global _JOB
        _JOB = job
        parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {pool.submit(_run_job, span): k for k, span in enumerate(spans)}
                for future in concurrent.futures.as_completed(futures):
                    k = futures[future]
                    parts[k] = future.result()  # a worker's ConfigError (a bad row) is raised here, as it was
                    progress(k)
        finally:
            _JOB = None
            if parallelism is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    skipped = sum(p[1] for p in parts)
    if text:
        tset = chunk_stream(np.concatenate([np.asarray(p[0], dtype=np.int32) for p in parts]), data_cfg.seq_len, name,
                            len(rows))
    else:
        tset = _join([p[0] for p in parts], name)
    tset = attrs.evolve(tset, rows_read=len(rows), skipped=skipped)
    if log is not None:
        seconds = time.perf_counter() - started
        log(f"data: rank {rank} tokenised {name} ({len(rows):,} rows) in {seconds:.1f}s with {workers} process(es), "
            f"{int(tset.input_ids.lengths().sum()) / max(seconds, 1e-9):,.0f} tokens/s")
    return tset


ROWS_PER_CHUNK = 2000  # below this many rows per process, forking costs more than it saves


def num_proc(data_cfg: DataConfig) -> int:
    """Tokenising processes: data.num_proc, else the cores this process may use (at most 16)."""
    if data_cfg.num_proc > 0:
        return data_cfg.num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores))


ROWS_PER_SPAN = 20_000  # rows formatted and tokenised at a time: Python objects for one span exist at once


def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges, contiguous and near-equal: at most ROWS_PER_SPAN rows each, and with several
    processes at least 4 per process (progress and balance)."""
    pieces = max(1, min(n, max(-(-n // ROWS_PER_SPAN), 1 if parts == 1 else parts * 4)))
    bounds = [n * k // pieces for k in range(pieces + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@attrs.frozen
class _Job:
    """Rows [start, stop) of a split -> (their TokenizedSet, or the token stream of `text` documents; bad rows
    skipped)."""

    src: DataSourceConfig
    rows: Any
    options: FormatOptions
    data_cfg: DataConfig
    tokenizer: PreTrainedTokenizerBase
    text: bool

    def __call__(self, span: tuple[int, int]) -> tuple[Any, int]:
        examples, skipped = load_examples(self.src, self.options, self.rows, self.data_cfg.on_bad_row, span)
        if self.text:
            return np.asarray(document_stream(examples, self.tokenizer), dtype=np.int32), skipped
        return tokenize_examples(examples, self.tokenizer, self.data_cfg.seq_len, self.data_cfg.truncate, ""), skipped


_JOB: Optional[_Job] = None  # what forked tokenising workers run


def _run_job(span: tuple[int, int]) -> tuple[Any, int]:
    return _JOB(span)


def _join(parts: list[TokenizedSet], name: str) -> TokenizedSet:
    return TokenizedSet(concat([p.input_ids for p in parts]), concat([p.labels for p in parts]),
                        [x for p in parts for x in p.prompt_lens], [x for p in parts for x in p.references], name,
                        sum(p.rows_read for p in parts), sum(p.dropped for p in parts), sum(p.truncated for p in parts))
