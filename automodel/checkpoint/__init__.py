"""Checkpoints: atomic, verified, resumable; every rank writes and checks its share.

`save` and `choose` and `restore` run on every rank; the backend's own save/load functions write and read the
weights and optimizer state, this package the step, data position, each rank's RNG, the manifest (manifest.py) and
the config's fingerprint (fingerprint.py). docs/reliability.md says what is guaranteed and how it is tested.
"""

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch

from automodel import storage
from automodel.checkpoint import fingerprint, manifest, store
from automodel.checkpoint.lock import RunLock
from automodel.config import ConfigError
from automodel.distributed import barrier, gather_objects
from automodel.training.state import TrainState, initial_rng

# train_state.json fields that must match the run being resumed.
MUST_MATCH = ("backend", "global_batch_size", "seed")
TRAIN_STATE_KEYS = ("step", "data_position") + MUST_MATCH
# Written into train_state.json from the version that writes manifests: a checkpoint that says so and has no
# manifest.json lost it (an interrupted copy, a deletion), and is damaged, not old.
FORMAT = 2


def save(save_fn: Callable[[TrainState, Path], None], state: TrainState, output_dir: Path, rank: int, world_size: int,
         keep_last: int, meta: dict[str, Any], tensors: dict[str, list], config: dict[str, Any],
         extra: Optional[dict[str, Any]] = None, keep: Optional[int] = None) -> Path:
    """Writes checkpoint `state.step` (collective: every rank calls it) and returns its directory. `tensors`: the
    trainable tensors' names, shapes and dtypes; `config`: the resolved config of this run; `extra`: more
    train_state.json fields (the evaluation record); `keep`: a step whose checkpoint is never pruned (the best)."""
    tmp = store.staging_dir(output_dir, state.step)
    try:
        if rank == 0:
            store.prepare(output_dir, state.step)
        barrier()
        store.save_rng(tmp, rank, state.rng)
        store.save_stream(tmp, rank, state.stream)
        save_fn(state, tmp)
        barrier()
        if rank == 0:
            store.write_train_state(tmp, {"step": state.step, "data_position": state.data_position, **meta,
                                          "checkpoint_format": FORMAT, **(extra or {})})
        barrier()
        files: dict[str, dict] = {}
        for share in gather_objects(manifest.hash_share(tmp, rank, world_size, sync=True)):
            files.update(share)
    except Exception as e:
        # A write cut short (torch.save's error does not say why): the half-written staging directory goes, so the
        # space comes back and the newest checkpoint stays the last good one. Full before it went: say so.
        full = storage.nearly_full(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full and storage.errno_of(e) not in storage.REFUSALS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir)) from e
        raise
    if rank == 0:
        manifest.write(tmp, files, tensors, config)
        store.commit(output_dir, state.step, keep_last, keep)
    barrier()
    return store.final_dir(output_dir, state.step)


def problems_of(path: Path, rank: int, world_size: int) -> list[str]:
    """What is wrong with a checkpoint (collective: every rank checks a share of its files); [] if nothing."""
    try:
        saved = store.read_train_state(path)
        found = [f"train_state.json lacks {k}" for k in TRAIN_STATE_KEYS if k not in saved]
        listed = manifest.read(path)
    except (OSError, ValueError) as e:  # unreadable or not JSON
        found, listed = [f"{type(e).__name__}: {e}"], None
    if listed is not None:
        found += manifest.check_share(path, listed, rank, world_size)
    elif not found and saved.get("checkpoint_format", 1) >= FORMAT:
        found.append("manifest.json is missing, though train_state.json says one was written")
    return sorted({p for share in gather_objects(found) for p in share})


def choose(paths: list[Path], rank: int, world_size: int, explicit: bool, log: Callable[[str], None]) -> Optional[Path]:
    """The first of `paths` that passes its check (every rank agrees). One that fails is reported and, with
    train.resume = "auto", moved aside (`.broken`); a checkpoint named explicitly that fails is an error."""
    for path in paths:
        problems = problems_of(path, rank, world_size)
        if not problems:
            listed = manifest.read(path)
            extra = manifest.unlisted(path, listed) if listed is not None else []
            if listed is None:
                log(f"checkpoint: {path} has no manifest (written by an older version): its files are not checked")
            elif extra:
                log(f"checkpoint: {path} holds {len(extra)} file(s) its manifest does not list ({', '.join(extra[:3])}"
                    f"{', ...' if len(extra) > 3 else ''}); they are ignored")
            return path
        message = f"{path} fails its check: {'; '.join(problems[:5])}"
        if explicit:
            raise ConfigError(f"train.resume: {message}")
        if rank == 0:
            log(f"checkpoint: {message}; moved to {store.quarantine(path)}, trying the one before it")
        barrier()
    return None


def restore(load_fn: Callable[[TrainState, Path], TrainState], state: TrainState, path: Path, rank: int,
            device: torch.device, meta: dict[str, Any], config: dict[str, Any], allowed: tuple[str, ...],
            tensors: dict[str, list]) -> tuple[TrainState, list[str]]:
    """(the state saved at `path`, the config changes accepted since it was written). Refused: another backend (ZeRO
    stage included), global batch size or seed (meta), training files whose bytes changed (meta["data"]), a config
    change to what is being trained (fingerprint.py), tensors of other names, shapes or dtypes than this model's.
    Another number of ranks is accepted and listed among the changes."""
    saved = store.read_train_state(path)
    for key in MUST_MATCH:
        if saved.get(key) != meta.get(key):
            raise ConfigError(f"cannot resume from {path}: it was written with {key} = {saved.get(key)!r}, this "
                              f"run has {meta.get(key)!r}; set train.resume = \"never\" or another output_dir")
    # The training files' bytes (data/identity.py; checkpoints written before it have none recorded).
    for source, then in (saved.get("data") or {}).items():
        now = meta.get("data", {}).get(source)
        if now is not None and now != then:
            raise ConfigError(f"cannot resume from {path}: the training data {source} is not what it trained on (then "
                              f"{then}, now {now}): the file was replaced or edited; put the original back, or start "
                              "afresh (train.resume = \"never\" or another output_dir)")
    listed = manifest.read(path)
    accepted: list[str] = []
    if listed is not None:
        refused, accepted = fingerprint.compare(listed["config"], config, allowed)
        if refused:
            raise ConfigError(f"cannot resume from {path}: the config changed what is being trained ("
                              f"{'; '.join(refused)}); start afresh (train.resume = \"never\" or another output_dir)"
                              ", or for optim/schedule keys list them in train.resume_allow_changes")
        wrong = manifest.tensor_problems(listed["tensors"], tensors)
        if wrong:
            raise ConfigError(f"cannot resume from {path}: its tensors do not match this model's "
                              f"({'; '.join(wrong[:3])})")
    if saved.get("world_size") not in (None, meta["world_size"]):  # allowed: the global batch is what must match
        accepted.append(f"ranks {saved['world_size']} -> {meta['world_size']}")
    state = attrs.evolve(state, step=saved["step"], data_position=saved["data_position"])
    state = load_fn(state, path)
    # Another number of ranks (functional backend) has no saved RNG for some ranks: derive one.
    rng = store.load_rng(path, rank) or initial_rng(meta["seed"] + saved["step"], rank, device)
    return attrs.evolve(state, rng=rng, stream=store.load_stream(path)), accepted


__all__ = ["RunLock", "choose", "fingerprint", "manifest", "restore", "save", "store"]
