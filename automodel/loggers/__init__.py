"""Where metrics go: the console (a tqdm bar on a terminal, plain lines otherwise), metrics.jsonl, the experiment
trackers (trackers.py) and plots/loss.png (plot.py)."""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from automodel.loggers.metrics import read_rows, row_key
from automodel.loggers.plot import LrCurve, lr_curve, plot_runs
from automodel.loggers.trackers import Tracker, catch_up, scalars



def format_row(row: dict[str, Any], max_steps: int) -> str:
    """`step 20/200 | loss 2.3456 | lr 1.00e-04 | grad_norm 1.234 | 12,345 tok/s | 85.3 ms/step | pad 12% |
    30.6 TFLOP/s | MFU 3.1%` (TFLOP/s and MFU per device, where the device's peak is known)"""
    if "eval_loss" in row:
        parts = [f"eval @ step {row['step']}/{max_steps}", f"eval_loss {row['eval_loss']:.4f}",
                 f"{row['eval_tokens']:,} tokens"]
        if "eval_rewards/accuracies" in row:  # a preference loss: eval_tokens counts pairs
            parts[2] = f"{row['eval_tokens']:,} pairs | reward accuracy {100 * row['eval_rewards/accuracies']:.1f}% " \
                       f"| margin {row['eval_rewards/margins']:.3f}"
        elif "eval_rewards/chosen" in row:  # KTO: examples
            parts[2] = f"{row['eval_tokens']:,} examples | rewards {row['eval_rewards/chosen']:.3f} / " \
                       f"{row['eval_rewards/rejected']:.3f}"
        if "exact_match" in row:
            parts.append(f"exact_match {100 * row['exact_match']:.1f}%")
        return " | ".join(parts)
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"grad_norm {row['grad_norm']:.3f}", f"{row['tokens_per_s']:,.0f} tok/s",
             f"{row['ms_per_step']:.1f} ms/step", f"pad {100 * row['padding']:.0f}%"]
    if "rewards/accuracies" in row:
        parts.append(f"reward accuracy {100 * row['rewards/accuracies']:.0f}% | margin {row['rewards/margins']:.3f}")
    elif "kl" in row:
        parts.append(f"kl {row['kl']:.3f}")
    if row.get("mfu") is not None:
        parts.append(f"{row['tflops']:.1f} TFLOP/s | MFU {100 * row['mfu']:.1f}%")
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} non-finite steps skipped")
    if row.get("passes"):  # streamed data
        passes = row["passes"]
        parts.append(f"pass {passes[0]}" if len(passes) == 1 else f"passes {', '.join(map(str, passes))}")
    return " | ".join(parts)


class RunLogger:
    """One per run; only rank 0 writes. `row(...)` prints a line and appends it to metrics.jsonl."""

    def __init__(self, output_dir: Path, max_steps: int, progress_bar: str, enabled: bool = True,
                 start_step: int = 0, continues: Optional[bool] = None, trackers: Sequence[Tracker] = (),
                 plot: bool = False, lr: Optional[LrCurve] = None):
        """`continues`: this run continues the one whose metrics.jsonl is in output_dir (by default: when it starts
        past step 0). A continuing run keeps every row the file holds (a step's first record is the one kept: the
        steps a resumed run redoes are not logged again) and gives each tracker the rows it lacks; a new run keeps
        an earlier file beside it as metrics-before-<time>.jsonl."""
        self.enabled = enabled
        self.max_steps = max_steps
        self.trackers = list(trackers)
        self.plot_path: Optional[Path] = output_dir / "plots" / "loss.png" if plot and enabled else None
        self.lr = lr  # the schedule step by step, for the plot
        self._output_dir = output_dir
        continues = start_step > 0 if continues is None else continues
        path = output_dir / "metrics.jsonl"
        rows: list[dict] = []
        dropped = 0
        kept_as = None
        if enabled and continues and path.exists():
            rows, dropped = read_rows(path)
            if dropped:  # rewritten without the lines a cut-short write left
                tmp = path.with_name(path.name + ".partial")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                os.replace(tmp, path)
        elif enabled and path.exists() and path.stat().st_size:
            kept_as = path.with_name(f"metrics-before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(path, kept_as)
        self._logged = {row_key(r) for r in rows}
        self._file = open(path, "a") if enabled else None
        self._summary = output_dir / "summary.json"
        if enabled:  # written again when this run finishes; until then the run is not done
            self._summary.unlink(missing_ok=True)
        show = progress_bar == "on" or (progress_bar == "auto" and sys.stderr.isatty())
        self._bar: Optional[tqdm] = (tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
                                     if enabled and show else None)
        if kept_as is not None:
            self.info(f"metrics.jsonl: the rows of the run that was here before are kept in {kept_as}")
        if dropped:
            self.info(f"metrics.jsonl: dropped {dropped} unreadable line(s) (a write cut short: a full disk or a "
                      "killed process)")
        for tracker in self.trackers if enabled else ():
            given = catch_up(tracker, rows)
            if given:
                self.info(f"{type(tracker).__name__}: logged {given} row(s) of metrics.jsonl it did not hold (a "
                          "process stopped between the file and the tracker)")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def row(self, row: dict[str, Any]) -> None:
        """Prints the row; records it (metrics.jsonl, then the trackers) unless its step's record is already there
        (a resumed run redoing steps: exact resume, the same numbers)."""
        if not self.enabled:
            return
        self.info(format_row(row, self.max_steps))
        if self._bar is not None and "loss" in row:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}")
        if row_key(row) in self._logged:
            return
        self._logged.add(row_key(row))
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for tracker in self.trackers:
            tracker.log(scalars(row), row["step"])
        if "eval_loss" in row:
            self.draw_plot()

    def draw_plot(self) -> None:
        """plots/loss.png from metrics.jsonl; a failure to draw is reported once and never stops the run."""
        if self.plot_path is None:
            return
        try:
            plot_runs([(self._output_dir.resolve().name, self._output_dir)], self.plot_path, lr=self.lr)
        except Exception as e:  # noqa: BLE001 - a picture is not worth a run
            self.info(f"plots: could not draw {self.plot_path} ({type(e).__name__}: {e}); no more plots this run")
            self.plot_path = None

    def summary(self, metrics: dict[str, Any]) -> None:
        """summary.json: the final metrics of a finished run (what `automodel sweep status` reads)."""
        if not self.enabled:
            return
        tmp = self._summary.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(self._summary)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        """Draws the last picture and closes the file and the trackers (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
            self.draw_plot()
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()
