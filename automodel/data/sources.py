"""Rows from a hub dataset id or a local file, through the `datasets` library."""

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets

from automodel.config import ConfigError, DataSourceConfig

# Local file extension -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(src: DataSourceConfig, on_bad_row: str = "error") -> datasets.Dataset:
    """The rows of `src.split` (datasets slicing syntax works), cut to `src.limit`. A .jsonl line that is not JSON
    is an error naming its line, or with on_bad_row = "skip" is left out."""
    path = _checked_path(src)
    squad_rows = _nested_squad_rows(path) if path.is_file() else None
    if squad_rows is not None:
        ds = _slice(datasets.Dataset.from_list(squad_rows), src.split, src.source)
    else:
        try:
            ds = _load(src, *_builder(src, path))
        except ConfigError:
            # pyarrow parses blocks ahead and names neither the file nor the line: find the line
            jsonl = path.is_file() and path.suffix.lower() == ".jsonl"
            bad = next(((n, why) for n, row, why in _json_lines(path) if row is None), None) if jsonl else None
            if bad is None:
                raise
            if on_bad_row != "skip":
                raise ConfigError(f"{src.source}: line {bad[0]} is not valid JSON ({bad[1]}); fix the line or set "
                                  "data.on_bad_row = \"skip\"") from None
            rows = [row for _, row, _ in _json_lines(path) if row is not None]
            ds = _slice(datasets.Dataset.from_list(rows), src.split, src.source)
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    return ds


def _json_lines(path: Path) -> Iterator[tuple[int, Optional[dict], str]]:
    """(1-based line number, the JSON object or None, why not) of each non-blank line of a JSON Lines file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, None, e.msg
                continue
            why = "" if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
            yield number, row if not why else None, why


def _checked_path(src: DataSourceConfig) -> Path:
    """`src.source` as a path; a missing local file or an empty one is an error (a hub id passes)."""
    path = Path(src.source)
    if not path.exists() and (path.suffix.lower() in BUILDERS or src.source.startswith((".", "/", "~"))):
        raise ConfigError(f"{src.source}: no such file (relative paths are relative to {Path.cwd()}); a hub dataset "
                          "id looks like `namespace/name`")
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigError(f"{src.source}: the file is empty")
    return path


def _builder(src: DataSourceConfig, path: Path) -> tuple[str, dict]:
    """(what `datasets.load_dataset` loads, its keyword arguments): a local file's builder, else the directory or
    hub id itself."""
    if not path.is_file():
        return src.source, {}
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"{src.source}: unsupported file type; use one of {', '.join(BUILDERS)}")
    return builder, {"data_files": str(path), **(_csv_as_text(path) if builder == "csv" else {})}


def _csv_as_text(path: Path) -> dict:
    """CSV cells stay text ("007" must not become the integer 7) and empty cells empty strings."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False}


def _load(src: DataSourceConfig, name: str, kwargs: dict, streaming: bool = False) -> Any:
    try:
        return datasets.load_dataset(name, split=src.split, streaming=streaming, **kwargs)
    except (FileNotFoundError, ValueError, StopIteration) as e:
        how = "streamed" if streaming else "loaded"
        hint = "; a stream cannot be sliced (`train[:90%]`): use `limit`" if streaming and "[" in src.split else ""
        raise ConfigError(f"data source `{src.source}` (split `{src.split}`) could not be {how}: {e}{hint}") from None
    except ConnectionError as e:
        raise ConfigError(f"data source `{src.source}`: not a local file and the hub is unreachable: {e}") from None


def _slice(ds: datasets.Dataset, split: str, source: str) -> datasets.Dataset:
    try:
        (instr,) = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(ds)})
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(f"{source}: bad split `{split}` (a local file has one split, `train`): {e}") from None
    return ds.select(range(instr.from_, instr.to))


def _nested_squad_rows(path: Path) -> Optional[list[dict]]:
    """Rows of the official SQuAD json ({"data": [{"title", "paragraphs": [{"context", "qas"}]}]}), one per
    question in the hub's `rajpurkar/squad` schema; None for any other file."""
    if path.suffix.lower() != ".json":
        return None
    with open(path, "rb") as f:
        if not f.read(64).lstrip().startswith(b"{"):
            return None  # a JSON array of rows
    try:
        with open(path) as f:
            top = json.load(f)
    except json.JSONDecodeError:
        return None  # JSON lines saved as .json
    articles = top.get("data") if isinstance(top, dict) else None
    if not (isinstance(articles, list) and articles and isinstance(articles[0], dict)
            and "paragraphs" in articles[0]):
        return None
    rows = []
    for article in articles:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append({
                    "id": qa["id"], "title": article.get("title", ""), "context": para["context"],
                    "question": qa["question"],
                    "answers": {"text": [a["text"] for a in qa["answers"]],
                                "answer_start": [a["answer_start"] for a in qa["answers"]]},
                })
    return rows


def open_stream(src: DataSourceConfig, rank: int = 0, world_size: int = 1) -> datasets.IterableDataset:
    """`src` as an iterable read as it goes (`streaming = true`): this rank's share of it (every world_size-th row,
    or whole files when a directory has a multiple of world_size of them), cut to `src.limit` rows first."""
    path = _checked_path(src)
    if path.is_file() and _nested_squad_rows_head(path):
        raise ConfigError(f"{src.source}: the official nested SQuAD json cannot be streamed (it is one JSON "
                          "document); set streaming = false, or convert it to JSON lines with one question per row")
    ds = _load(src, *_builder(src, path), streaming=True)
    if src.limit is not None:
        ds = ds.take(src.limit)
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


def _nested_squad_rows_head(path: Path) -> bool:
    """Whether a .json file looks like the official nested SQuAD document (without reading all of it)."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{") and b'"data"' in head[:64] and b'"paragraphs"' in head
