"""Checkpoints: atomic, resumable, every rank's share.

`save` and `restore` run on every rank; the backend's own save/load functions write and read the
weights and optimizer state, this module the step, data position and each rank's RNG.
"""

from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from automodel.checkpoint import store
from automodel.config import ConfigError
from automodel.distributed import barrier
from automodel.training.state import TrainState, initial_rng

# train_state.json fields that must match the run being resumed.
MUST_MATCH = ("backend", "global_batch_size", "seed")


def save(save_fn: Callable[[TrainState, Path], None], state: TrainState, output_dir: Path, rank: int,
         keep_last: int, meta: dict[str, Any]) -> Path:
    """Writes checkpoint `state.step` (collective: every rank calls it) and returns its directory."""
    if rank == 0:
        store.prepare(output_dir, state.step)
    barrier()
    tmp = store.staging_dir(output_dir, state.step)
    store.save_rng(tmp, rank, state.rng)
    save_fn(state, tmp)
    barrier()
    if rank == 0:
        store.commit(output_dir, state.step, {"step": state.step, "data_position": state.data_position, **meta},
                     keep_last)
    barrier()
    return store.final_dir(output_dir, state.step)


def restore(load_fn: Callable[[TrainState, Path], TrainState], state: TrainState, path: Path, rank: int,
            device: torch.device, meta: dict[str, Any]) -> TrainState:
    """The state saved at `path`, checked against this run's `meta` (backend, batch size, seed, ranks)."""
    saved = store.read_train_state(path)
    for key in MUST_MATCH + (("world_size",) if meta["backend"].startswith("deepspeed") else ()):
        if saved.get(key) != meta.get(key):
            raise ConfigError(f"cannot resume from {path}: it was written with {key} = {saved.get(key)!r}, this "
                              f"run has {meta.get(key)!r}; set train.resume = \"never\" or another output_dir")
    state = attrs.evolve(state, step=saved["step"], data_position=saved["data_position"])
    state = load_fn(state, path)
    # Another number of ranks (functional backend) has no saved RNG for some ranks: derive one.
    rng = store.load_rng(path, rank) or initial_rng(meta["seed"] + saved["step"], rank, device)
    return attrs.evolve(state, rng=rng)


__all__ = ["restore", "save", "store"]
