"""A DeepSpeed checkpoint written on N ranks, loaded on M: through DeepSpeed's universal checkpoint.

ZeRO 1-3 save each rank's shard of the optimizer state (and under ZeRO-3 of the weights); an engine refuses shards
cut for another number of ranks. `deepspeed.checkpoint.ds_to_universal` joins them into whole tensors per parameter
(float32 weights, both Adam moments, the step), which an engine of any size slices again (`load_universal`).

The converted copy is written by rank 0 beside the checkpoint as `.universal-<name>/` (under a temporary name first,
renamed once whole and listed in its own manifest.json, so that a kill during the conversion leaves nothing that
looks usable and never touches the original); the other ranks wait. A copy that is there and passes its manifest is
reused; one that does not is converted again. Once every rank has loaded it, it is removed: the run's next checkpoint
is written at its new size.
"""

import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch.distributed as dist

from automodel.checkpoint import manifest

PREFIX = ".universal-"


def saved_ranks(engine_dir: Path) -> int:
    """How many data-parallel ranks wrote this engine checkpoint: one optimizer shard each under ZeRO 1-3 (bf16_ is
    the prefix of bf16 ZeRO-1's); 0 at ZeRO-0, whose optimizer state is whole in the model states file."""
    return len(list(engine_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def universal_dir(checkpoint: Path) -> Path:
    return checkpoint.parent / f"{PREFIX}{checkpoint.name}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def convert(checkpoint: Path, engine_tag: str, rank: int, log: Callable[[str], None]) -> Path:
    """The universal copy of `checkpoint`/`engine_tag` (a collective: rank 0 converts, every rank returns the folder
    whose `engine_tag` subfolder an engine loads with load_universal)."""
    out = universal_dir(checkpoint)
    if rank == 0:
        listed = manifest.read(out)
        problems = ["no manifest"] if listed is None else manifest.check_share(out, listed, 0, 1)
        if problems:
            if out.exists():
                log(f"checkpoint: the universal copy {out} is incomplete ({problems[0]}); converting again")
            _convert(checkpoint / engine_tag, out, engine_tag)
    _barrier()
    return out


def _convert(source: Path, out: Path, engine_tag: str) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.parent / f"{out.name}.tmp"
    for stale in (tmp, out):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    # One worker of each kind: no process pool (it would fork this process, its threads and its process group).
    # inject_missing_state: a plain (not tensor-parallel) model's checkpoint lacks the universal_checkpoint_info the
    # converter checks for.
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        ds_to_universal(SimpleNamespace(input_folder=str(source), output_folder=str(tmp / engine_tag),
                                        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                        strict=True, inject_missing_state=True))
    (tmp / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; the tag is always given
    manifest.write(tmp, manifest.hash_share(tmp, 0, 1, sync=True), {}, {})
    tmp.rename(out)


def remove(checkpoint: Path, rank: int) -> None:
    """Once every rank has loaded the universal copy (a collective), rank 0 removes it."""
    _barrier()
    if rank == 0:
        shutil.rmtree(universal_dir(checkpoint), ignore_errors=True)
