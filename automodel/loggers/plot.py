"""Loss curves as pictures: <output_dir>/plots/loss.png during a run, and `automodel plot` over runs and sweeps."""

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from automodel.config import ConfigError
from automodel.loggers.metrics import read_rows


def runs_of(paths: Sequence[Path]) -> list[tuple[str, Path]]:
    """(label, run directory) for each path: a run (metrics.jsonl) labelled by its name, or a sweep (sweep.json)
    whose tasks are each labelled by their overrides."""
    runs: list[tuple[str, Path]] = []
    for path in map(Path, paths):
        if (path / "sweep.json").is_file():
            for task in json.loads((path / "sweep.json").read_text())["tasks"]:
                label = " ".join(task["overrides"]) or f"task {task['index']}"
                runs.append((label, Path(task["run_dir"])))
        elif (path / "metrics.jsonl").is_file():
            runs.append((path.resolve().name, path))
        else:
            raise ConfigError(f"{path}: neither a run directory (metrics.jsonl) nor a sweep (sweep.json)")
    return runs


LrCurve = Sequence[tuple[int, float]]  # (step, learning rate), the step as metrics.jsonl numbers it


def lr_curve(lr_fn: Callable[[int], float], max_steps: int, points: int = 2000) -> list[tuple[int, float]]:
    """The schedule at every step (at most `points` of them, evenly spaced): the row of step k logs the rate of
    its update, lr_fn(k - 1). Cheap: the schedule is a pure function of the step."""
    stride = max(1, math.ceil(max_steps / points))
    steps = sorted({*range(1, max_steps + 1, stride), max_steps})
    return [(k, lr_fn(k - 1)) for k in steps]


def plot_runs(runs: Sequence[tuple[str, Path]], out: Path, title: Optional[str] = None,
              lr: Optional[LrCurve] = None) -> Path:
    """loss.png: train loss (lines) and each validation set's loss (dots joined by dashes) of each run, the best
    step where the run kept it; below, exact match and (one run) the learning rate, `lr` step by step where given
    (else the logged values). Written to a temporary file and renamed, so a viewer never sees half a picture."""
    from matplotlib import pyplot as plt

    fig = draw(runs, title, lr)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def draw(runs: Sequence[tuple[str, Path]], title: Optional[str] = None, lr: Optional[LrCurve] = None) -> Any:
    """The figure plot_runs saves: axes[0] the losses, axes[1] exact match and the learning rate (a panel drawn only
    when there is one of them to show: several runs without exact match have none)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    single = len(runs) == 1
    all_rows = []
    for _, run_dir in runs:
        metrics = Path(run_dir) / "metrics.jsonl"
        all_rows.append(read_rows(metrics)[0] if metrics.is_file() else [])
    lower = (single and (bool(lr) or bool(_series(all_rows[0], "lr")))) or any(
        _series(rows, "exact_match") for rows in all_rows)
    if lower:
        fig, (ax, below) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1.3]})
        match_axis = below.twinx() if single else below
    else:
        fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
        below = match_axis = None
    log_scale = True
    for i, ((label, run_dir), rows) in enumerate(zip(runs, all_rows)):
        color = f"C{i % 10}"
        name = "" if single else label
        train = _series(rows, "loss")
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.4, label=f"{name} train loss".strip())
        eval_keys = sorted({k for r in rows for k in r if k == "eval_loss" or k.startswith("eval_loss/")})
        for j, key in enumerate(eval_keys):
            evals = _series(rows, key)
            what = "eval loss" + (f" ({key.split('/', 1)[1]})" if "/" in key else
                                  " (all sets)" if len(eval_keys) > 1 else "")
            ax.plot(*zip(*evals), color=f"C{(i + j) % 10}" if single else color, linestyle="--",
                    marker="osD^v"[j % 5], markersize=4, label=f"{name} {what}".strip())
            log_scale &= all(v > 0 for _, v in evals)
        log_scale &= all(v > 0 for _, v in train)
        matches = [(step, 100 * v) for step, v in _series(rows, "exact_match")]
        if matches:
            match_axis.plot(*zip(*matches), color="C2" if single else color, marker="o", markersize=4, linewidth=1.0,
                            label=f"{name} exact match".strip())
        best = _best_step(Path(run_dir))
        if best is not None:
            ax.axvline(best, color=color, linewidth=1.0, alpha=0.6, linestyle="-.",
                       label=f"{name} kept: best step {best}".strip())
        if single:
            curve = list(lr) if lr else _series(rows, "lr")
            if curve:
                below.plot(*zip(*curve), color="0.45", linewidth=1.0, label="learning rate")
                below.set_ylabel("learning rate")
                below.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if log_scale and ax.lines:
        _log_axis(ax)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.set_title(title if title is not None else (runs[0][0] if single else f"{len(runs)} runs"))
    if ax.lines:
        ax.legend(fontsize=8, loc="upper right")
    if below is None:
        ax.set_xlabel("step")
        fig.tight_layout()
        return fig
    match_axis.set_ylabel("exact match (%)")
    if match_axis.lines:
        match_axis.set_ylim(-3, 103)
    below.set_xlabel("step")
    below.grid(True, alpha=0.3)
    handles, labels = below.get_legend_handles_labels()
    if match_axis is not below:
        more = match_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        below.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def _series(rows: Sequence[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r and _finite(r[key])]


def _best_step(run_dir: Path) -> Optional[int]:
    """The step whose weights a run with train.keep_best exported (summary.json), if any."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text()).get("best_step")
    except (OSError, ValueError):
        return None


def _log_axis(ax: Any) -> None:
    """Log scale with plain labels (2, 3, 4 rather than 2x10^0). Minor ticks are labelled only where a decade or
    less is shown, and then only at 2 and 5: labels at every minor tick overlap."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    if high / max(low, 1e-300) <= 10 ** 1.2:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
