"""Reading metrics.jsonl back."""

import json
from pathlib import Path


def read_rows(path: Path) -> tuple[list[dict], int]:
    """(the rows of a metrics.jsonl, how many lines could not be read): a torn last line, say, is left out."""
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def row_key(row: dict) -> tuple[int, str]:
    """What a row is the record of: (step, "train") or (step, "eval"). A step's first record is the one kept."""
    return row["step"], "eval" if "eval_loss" in row else "train"
