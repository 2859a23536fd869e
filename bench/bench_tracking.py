"""What watching a run costs: per logged row, each tracker's time (against writing the metrics.jsonl line alone, the
baseline every run pays), and the time to redraw plots/loss.png as the run grows.

    python bench/bench_tracking.py [--rows 200]

Prints a JSON line per measurement. Trackers run offline (W&B offline, MLflow's SQLite store, TensorBoard files).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from automodel.config import TrainConfig, to_dict, to_toml
from automodel.loggers import RunLogger, trackers
from automodel.loggers.plot import plot_runs


def train_row(step: int) -> dict:
    return {"step": step, "loss": 4.0 / step, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1e4, "ms_per_step": 100.0,
            "epoch": step / 1000, "mfu": None, "padding": 0.1, "run_padding": 0.1}


def per_row_ms(backends: list[str], rows: int, root: Path) -> tuple[float, float]:
    """(ms to open the trackers, ms per logged row) for a RunLogger with these trackers."""
    from automodel.config.schema import LoggingConfig

    out = root / ("_".join(backends) or "jsonl")
    out.mkdir(parents=True)
    cfg = TrainConfig(output_dir=str(out))
    started = time.perf_counter()
    opened = trackers.open_trackers(LoggingConfig(backends=backends, wandb_mode="offline"), out, to_dict(cfg),
                                    to_toml(cfg), False, 0)
    opened_ms = 1000 * (time.perf_counter() - started)
    logger = RunLogger(out, rows, "off", trackers=opened)
    started = time.perf_counter()
    for step in range(1, rows + 1):
        logger.row(train_row(step))
    row_ms = 1000 * (time.perf_counter() - started) / rows
    logger.close()
    return opened_ms, row_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, base = per_row_ms([], args.rows, root)
        print(json.dumps({"what": "metrics.jsonl + console line per row", "ms_per_row": round(base, 3)}), flush=True)
        for backend in ("tensorboard", "wandb", "mlflow"):
            open_ms, row = per_row_ms([backend], args.rows, root)
            print(json.dumps({"what": f"{backend} per row", "ms_per_row": round(row, 3),
                              "extra_ms_per_row": round(row - base, 3), "open_ms": round(open_ms, 1)}), flush=True)
        for n in (100, 1000, 10000):
            run = root / f"plot{n}"
            run.mkdir()
            rows = [train_row(s) for s in range(1, n + 1)] + [
                {"step": s, "eval_loss": 4.0 / s, "eval_tokens": 1} for s in range(1, n + 1, max(1, n // 20))]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            plot_runs([("r", run)], run / "loss.png")  # warm: matplotlib's first import and font cache
            started = time.perf_counter()
            plot_runs([("r", run)], run / "loss.png")
            print(json.dumps({"what": f"redraw loss.png from {n} logged rows",
                              "ms": round(1000 * (time.perf_counter() - started), 1)}), flush=True)


if __name__ == "__main__":
    main()
