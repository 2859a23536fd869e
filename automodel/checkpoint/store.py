"""Resumable checkpoints, written so that a crash never leaves one that resume would choose.

    <output_dir>/checkpoints/.tmp-step_000200/   being written: never chosen
    <output_dir>/checkpoints/step_000100/        COMPLETE (written last), train_state.json, rng/, weights
    <output_dir>/checkpoints/latest              the newest complete one's name, replaced after the rename

A checkpoint is written into the temporary directory by every rank, marked complete by rank 0, then
renamed; only then is `latest` updated and are checkpoints beyond `keep_last` deleted.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from automodel.config import ConfigError

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^step_(\d{6,})$")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def staging_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f".tmp-step_{step:06d}"


def final_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "train_state.json").is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary and unmarked directories are never listed."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def resume_path(output_dir: Path, resume: str) -> Optional[Path]:
    """What `train.resume` points at: None to start afresh."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(f"train.resume = {resume!r}: not a complete checkpoint directory (it needs "
                          f"{COMPLETE} and train_state.json); use \"auto\" to take the newest in output_dir")
    return path


def prepare(output_dir: Path, step: int) -> Path:
    """Rank 0: a fresh staging directory for `step` (a leftover from a crash is removed)."""
    tmp = staging_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rng").mkdir(parents=True)
    return tmp


def save_rng(tmp: Path, rank: int, rng: dict[str, torch.Tensor]) -> None:
    torch.save(rng, tmp / "rng" / f"rank_{rank:05d}.pt")


def load_rng(path: Path, rank: int) -> Optional[dict[str, torch.Tensor]]:
    file = path / "rng" / f"rank_{rank:05d}.pt"
    return torch.load(file, weights_only=True) if file.is_file() else None


def commit(output_dir: Path, step: int, train_state: dict[str, Any], keep_last: int) -> Path:
    """Rank 0, after every rank has written: mark complete, rename, point `latest` at it, prune."""
    tmp, final = staging_dir(output_dir, step), final_dir(output_dir, step)
    _write_atomic(tmp / "train_state.json", json.dumps(train_state, indent=2))
    _write_atomic(tmp / COMPLETE, "")
    if final.exists():  # the same step saved again (a resumed run that ended where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(checkpoints_dir(output_dir) / "latest", final.name + "\n")
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "train_state.json").read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
