"""Sweeps: override sets from `--sweep KEY=A,B,...` grids or a sweep file, their run directories, sweep.json,
and the status table of a finished (or running) sweep.

A sweep file is TOML with a `[grid]` table (each dotted key -> a list of values; the cross product) and/or
`[[runs]]` entries (each a table of dotted key -> value: one point each):

    max_parallel = 2                 # optional: at most this many array tasks at once (--array=0-K%M)
    [grid]
    "optim.lr" = [1e-4, 3e-4]
    [[runs]]
    "optim.lr" = 1e-3
    "peft.rank" = 16
"""

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs
import tomli_w

from automodel.config import ConfigError
from automodel.config.load import parse_override, read_toml
from automodel.loggers.metrics import read_rows


@attrs.frozen
class SweepPlan:
    points: tuple[tuple[str, ...], ...]  # each: overrides "key=value" in TOML syntax
    max_parallel: int = 0


def split_values(text: str) -> list[str]:
    """`1e-5,3e-5` -> ["1e-5", "3e-5"]; commas inside [...], {...} or quotes do not split (`[1,2],[3,4]`)."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def grid_from_flags(sweeps: Sequence[str]) -> list[tuple[str, ...]]:
    """["optim.lr=1e-5,3e-5", "peft.rank=8,16"] -> 4 override sets, the last flag varying fastest."""
    axes = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--sweep `{text}`: expected KEY=V1,V2,..., e.g. --sweep optim.lr=1e-5,3e-5")
        items = split_values(values)
        if any(not v for v in items):
            raise ConfigError(f"--sweep `{text}`: an empty value; separate values with single commas")
        if len(set(items)) != len(items):
            raise ConfigError(f"--sweep `{text}`: a value is repeated")
        axes.append([f"{key}={v}" for v in items])
    keys = [a[0].partition("=")[0] for a in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep: key given twice ({', '.join(sorted(k for k in keys if keys.count(k) > 1))}); "
                          "list all its values in one --sweep")
    return [tuple(p) for p in itertools.product(*axes)] if axes else []


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def read_sweep_file(path: str) -> SweepPlan:
    raw = read_toml(path)
    unknown = set(raw) - {"grid", "runs", "max_parallel"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a sweep file has [grid], [[runs]] "
                          "and max_parallel")
    grid = raw.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: [grid] maps each dotted key to a non-empty list of values, "
                          "e.g. \"optim.lr\" = [1e-4, 3e-4]")
    points = [tuple(f"{k}={_toml_value(v)}" for k, v in zip(grid, combo))
              for combo in itertools.product(*grid.values())] if grid else []
    runs = raw.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) and r for r in runs):
        raise ConfigError(f"{path}: [[runs]] entries are tables of dotted key = value, e.g. \"optim.lr\" = 1e-3")
    for i, run in enumerate(runs):
        nested = [k for k, v in run.items() if isinstance(v, dict)]
        if nested:
            raise ConfigError(f"{path}: runs[{i}]: quote dotted keys (\"{nested[0]}.x\" = ...), or TOML reads "
                              "them as nested tables")
        points.append(tuple(f"{k}={_toml_value(v)}" for k, v in run.items()))
    if not points:
        raise ConfigError(f"{path}: no sweep points; add a [grid] table or [[runs]] entries")
    max_parallel = raw.get("max_parallel", 0)
    if not isinstance(max_parallel, int) or isinstance(max_parallel, bool) or max_parallel < 0:
        raise ConfigError(f"{path}: max_parallel must be an integer >= 0 (0: no limit)")
    return SweepPlan(tuple(points), max_parallel)


def run_name(overrides: Sequence[str]) -> str:
    """A directory name from an override set: ("optim.lr=3e-5", "peft.rank=8") -> "lr-3e-5_rank-8"."""
    parts = []
    for text in overrides:
        path, _ = parse_override(text)
        value = text.partition("=")[2].strip().strip("\"'")
        parts.append(f"{path[-1]}-{value}")
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-.") or "run"
    return name[:120]


def run_dirs(base: Path, points: Sequence[Sequence[str]]) -> list[Path]:
    """One directory per point under base, named after its overrides (an index is added to repeats)."""
    names = [run_name(p) for p in points]
    width = len(str(len(points) - 1))
    return [base / (n if names.count(n) == 1 else f"{n}_{i:0{width}d}") for i, n in enumerate(names)]


def check_no_output_dir(points: Sequence[Sequence[str]]) -> None:
    for p in points:
        if any(parse_override(o)[0] == ["output_dir"] for o in p):
            raise ConfigError("a sweep sets each task's output_dir itself (named after its overrides); "
                              "do not sweep output_dir")


def write_sweep_json(path: Path, config: str, points: Sequence[Sequence[str]], dirs: Sequence[Path],
                     script: Optional[Path]) -> None:
    tasks = [{"index": i, "overrides": list(p), "run_dir": str(d)} for i, (p, d) in enumerate(zip(points, dirs))]
    doc = {"config": config, "script": str(script) if script else None, "tasks": tasks}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# automodel sweep status RUN_DIR


def task_status(run_dir: Path) -> dict[str, Any]:
    """What a task's files say: done (summary.json), running or stopped (metrics only), or pending."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        return {"state": "done", **json.loads(summary.read_text())}
    metrics = run_dir / "metrics.jsonl"
    rows = read_rows(metrics)[0] if metrics.is_file() else []  # (a line being written is left out)
    if not rows:
        return {"state": "pending"}
    last_train = next((r for r in reversed(rows) if "loss" in r), {})
    last_eval = next((r for r in reversed(rows) if "eval_loss" in r), {})
    return {"state": "started", "steps": max(r.get("step", 0) for r in rows), "train_loss": last_train.get("loss"),
            **{k: last_eval[k] for k in ("eval_loss", "exact_match") if k in last_eval}}


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.4f}" if isinstance(value, float) else str(value)


def status_table(sweep_dir: Path) -> str:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; give the output_dir of a sweep made by `automodel launch --sweep`")
    doc = json.loads(path.read_text())
    header = ["#", "state", "steps", "train_loss", "eval_loss", "exact_match", "overrides"]
    rows = []
    for task in doc["tasks"]:
        s = task_status(Path(task["run_dir"]))
        rows.append([str(task["index"]), s["state"], _fmt(s.get("steps")), _fmt(s.get("train_loss")),
                     _fmt(s.get("eval_loss")), _fmt(s.get("exact_match"), pct=True), " ".join(task["overrides"])])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    done = sum(r[1] == "done" for r in rows)
    lines.append(f"{done}/{len(rows)} done; run directories under {sweep_dir}")
    return "\n".join(lines) + "\n"
