"""Loss curves as pictures: <output_dir>/plots/loss.png during a run, and `automodel plot` over runs and sweeps."""

import json
import math
from pathlib import Path
from typing import Optional, Sequence

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


def plot_runs(runs: Sequence[tuple[str, Path]], out: Path, title: Optional[str] = None) -> Path:
    """Train loss (lines) and eval loss (dots joined by dashes) of each run; with one run, the learning rate on a
    second axis. Written to a temporary file and renamed, so a viewer never sees half a picture."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    lr_axis = None
    log_scale = True
    for i, (label, run_dir) in enumerate(runs):
        metrics = Path(run_dir) / "metrics.jsonl"
        rows = read_rows(metrics)[0] if metrics.is_file() else []
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and _finite(r["loss"])]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and _finite(r["eval_loss"])]
        color = f"C{i % 10}"
        name = label if len(runs) > 1 else ""
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.4, label=f"{name} train loss".strip())
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", markersize=4,
                    label=f"{name} eval loss".strip())
        log_scale &= all(v > 0 for _, v in train + evals)
        if len(runs) == 1:
            lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r and _finite(r["lr"])]
            if lrs:
                lr_axis = ax.twinx()
                lr_axis.plot(*zip(*lrs), color="0.55", linewidth=1.0, linestyle=":", label="learning rate")
                lr_axis.set_ylabel("learning rate")
                lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if log_scale and ax.lines:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 3, 4 rather than 2x10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.set_title(title if title is not None else (runs[0][0] if len(runs) == 1 else f"{len(runs)} runs"))
    handles, labels = ax.get_legend_handles_labels()
    if lr_axis is not None:
        more = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
