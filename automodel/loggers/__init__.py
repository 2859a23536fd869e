"""Where metrics go: the console (a tqdm bar on a terminal, plain lines otherwise) and metrics.jsonl."""

import json
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from automodel.training.metrics import format_row


class RunLogger:
    """One per run; only rank 0 writes. `row(...)` prints a line and appends it to metrics.jsonl."""

    def __init__(self, output_dir: Path, max_steps: int, progress_bar: str, enabled: bool = True,
                 start_step: int = 0):
        self.enabled = enabled
        self.max_steps = max_steps
        # A run from step 0 starts the file afresh; a resumed one continues it, without the rows of the
        # steps it is about to redo (logged after its checkpoint by the run that stopped).
        path = output_dir / "metrics.jsonl"
        if enabled and start_step > 0 and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self._file = open(path, "a" if start_step > 0 else "w") if enabled else None
        self._summary = output_dir / "summary.json"
        if enabled:  # written again when this run finishes; until then the run is not done
            self._summary.unlink(missing_ok=True)
        show = progress_bar == "on" or (progress_bar == "auto" and sys.stderr.isatty())
        self._bar: Optional[tqdm] = (tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
                                     if enabled and show else None)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def row(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.info(format_row(row, self.max_steps))
        if self._bar is not None and "loss" in row:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}")

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
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
