"""Resumable checkpoints on disk, written so that a crash never leaves one that resume would choose.

    <output_dir>/checkpoints/.tmp-step_000200/   being written: never chosen
    <output_dir>/checkpoints/step_000100/        manifest.json (files, digests, tensors, config), train_state.json,
                                                 rng/, stream/ (streamed data), the backend's files, COMPLETE
                                                 (written last)
    <output_dir>/checkpoints/step_000050.broken/ failed its check at resume: kept for inspection, never chosen
    <output_dir>/checkpoints/latest              the newest complete one's name, replaced after the rename

A checkpoint is written into the temporary directory by every rank; its files are hashed (and flushed to disk) by
the ranks, rank 0 writes the manifest and marks it complete, the directory is flushed, renamed and the rename
flushed; only then is `latest` updated and are checkpoints beyond `keep_last` deleted (never the new one).
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
BROKEN = ".broken"
PRUNING = ".pruning"  # a checkpoint being deleted
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
    """Complete checkpoints, oldest first. Temporary, broken and unmarked directories are never listed."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def candidates(output_dir: Path, resume: str) -> list[Path]:
    """What `train.resume` points at, best first: "never" nothing, "auto" every complete checkpoint newest first
    (resume takes the first that passes its check), or the one directory named."""
    if resume == "never":
        return []
    if resume == "auto":
        return complete_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(f"train.resume = {resume!r}: not a complete checkpoint directory (it needs "
                          f"{COMPLETE} and train_state.json); use \"auto\" to take the newest in output_dir")
    return [path]


def quarantine(path: Path) -> Path:
    """Rank 0: moves a checkpoint that failed its check aside, so that it is never chosen or pruned."""
    target = path.with_name(path.name + BROKEN)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


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


def save_stream(tmp: Path, rank: int, position: Optional[dict]) -> None:
    """A rank's stream position (streamed data only), beside its RNG."""
    if position is not None:
        (tmp / "stream").mkdir(exist_ok=True)
        _write_atomic(tmp / "stream" / f"rank_{rank:05d}.json", json.dumps(position))


def load_stream(path: Path) -> Optional[dict]:
    """Every shard's saved stream position ({"shards": count, "positions": {shard: position}}), gathered from the
    ranks' files, whatever number of ranks wrote them; None when the checkpoint has none (data read in full)."""
    folder = path / "stream"
    if not folder.is_dir():
        return None
    # The writer's number of ranks as train_state.json records it (a stray file in the folder does not count).
    saved_ranks = read_train_state(path).get("world_size") or len(list(folder.glob("rank_*.json")))
    count, positions = saved_ranks, {}
    for rank in range(saved_ranks):
        file = folder / f"rank_{rank:05d}.json"
        if not file.is_file():  # (a rank that read only shards another rank read too is not missed)
            continue
        saved = json.loads(file.read_text())
        if "shards" in saved:
            count = saved["shards"]
            positions.update(saved["positions"])
        else:  # written before a stream recorded its shards: one shard a rank
            positions[str(rank)] = saved
    missing = [v for v in range(count) if str(v) not in positions]
    if missing:
        raise ConfigError(f"cannot resume from {path}: its stream/ folder lacks the position of shard(s) "
                          f"{', '.join(map(str, missing))} of {count}; resume from another checkpoint, or start afresh "
                          "(train.resume = \"never\" or another output_dir)")
    return {"shards": count, "positions": positions}


def write_train_state(tmp: Path, train_state: dict[str, Any]) -> None:
    """Rank 0, before the files are hashed (so the manifest covers it)."""
    _write_atomic(tmp / "train_state.json", json.dumps(train_state, indent=2))


def commit(output_dir: Path, step: int, keep_last: int, keep: Optional[int] = None) -> Path:
    """Rank 0, once the manifest is written: mark complete, rename, point `latest` at it, prune (never the new one,
    nor that of step `keep`)."""
    tmp, final = staging_dir(output_dir, step), final_dir(output_dir, step)
    for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_dir(directory)
    _write_atomic(tmp / COMPLETE, "")
    if final.exists():  # the same step saved again (a resumed run that ended where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    _write_atomic(checkpoints_dir(output_dir) / "latest", final.name + "\n")
    protected = {final} | ({final_dir(output_dir, keep)} if keep is not None else set())
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        if old not in protected:
            # Renamed first (atomic), then deleted: a kill half-way leaves a *.pruning folder, never a checkpoint
            # missing some files; whatever a killed run left is deleted here, at the next prune.
            doomed = old.with_name(old.name + PRUNING)
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
    for doomed in checkpoints_dir(output_dir).glob(f"*{PRUNING}"):
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "train_state.json").read_text())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
