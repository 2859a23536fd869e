"""Which config changes a resumed run may make: the checkpoint's resolved config against this run's, key by key.

- What is being trained may not change: the model and its dtype, the tokenizer, the training data and how it is
  tokenised (sources, formats, seq_len, packing ...), the global batch, the seed, LoRA, distillation, the preference
  loss and its reference, the backend and ZeRO stage. A change there means another run: refused, naming each key with its old and new value.
- The optimizer and the schedule may change only when `train.resume_allow_changes` names them (a key, or a whole
  section such as "optim"): a changed learning rate is a decision, not an accident.
- Everything else (length: max_steps/epochs, which recomputes the schedule over the new length; cadence of logs,
  evaluations and checkpoints; micro-batch size, which exact normalisation makes equivalent; memory settings;
  validation data; logging; launch) may change, and the run says what changed.
"""

from pathlib import Path
from typing import Any

from automodel.config import flatten

FROZEN = ("recipe", "seed", "model", "tokenizer", "peft", "distill", "preference", "data", "train.global_batch_size",
          "distributed.backend", "distributed.zero_stage")
NEEDS_ALLOW = ("optim", "schedule")
# Inside the frozen sections, what changes how a run computes but not what it trains.
FREE_INSIDE = ("model.attn_implementation", "data.validation", "data.validation_fraction", "data.cache_dir",
               "data.on_bad_row", "data.num_proc", "preference.precompute_reference")


PATH_KEYS = ("name_or_path", "source", "teacher", "reference", "cache_dir")


def _same(key: str, before: Any, after: Any) -> bool:
    """Equal, or the same local file or directory written differently (relative or absolute)."""
    if before == after:
        return True
    if key.rsplit(".", 1)[-1] in PATH_KEYS and isinstance(before, str) and isinstance(after, str):
        a, b = Path(before).expanduser(), Path(after).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def compare(saved: dict[str, Any], current: dict[str, Any],
            allowed: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(refused changes, accepted changes), each as `key: old -> new` lines."""
    # flatten reads one [data.train] table and an array holding one alike: a checkpoint written before arrays of
    # sources existed compares key by key with today's config.
    old, new = flatten(saved), flatten(current)
    refused, accepted = [], []
    for key in sorted(set(old) | set(new)):
        if key in ("train.resume", "train.resume_allow_changes", "output_dir"):
            continue
        before, after = old.get(key), new.get(key)
        if _same(key, before, after):
            continue
        line = f"{key}: {before!r} -> {after!r}"
        frozen = _under(key, FROZEN) and not _under(key, FREE_INSIDE)
        needs_allow = _under(key, NEEDS_ALLOW) and not _under(key, allowed)
        (refused if frozen or needs_allow else accepted).append(line)
    return refused, accepted
