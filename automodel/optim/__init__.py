"""The optimizers (AdamW with float32 or 8-bit states, over dicts of tensors, in place) and pure learning-rate
schedules. `optimizer(name)` gives the pair a step needs: a state's init and its in-place update."""

import functools
from typing import Any, Callable

import attrs

from automodel.optim.adamw import (AdamWHyper, AdamWState, Tensors, adamw_init, adamw_update_, clip_by_global_norm_,
                                   global_norm, no_decay_names)
from automodel.optim.adamw8bit import AdamW8bitState, adamw8bit_init, adamw8bit_update_, state_bytes
from automodel.optim.schedules import lr_at


@attrs.frozen
class Optimizer:
    name: str
    init: Callable[[Tensors], Any]  # params -> the zero state
    update_: Callable[[Tensors, Tensors, Any, float, AdamWHyper], tuple[Tensors, Any]]  # in place, as adamw_update_


def optimizer(name: str = "adamw", paged: bool = False) -> Optimizer:
    """optim.name -> its functional form: "adamw" (optim/adamw.py) or "adamw8bit" (optim/adamw8bit.py)."""
    if name == "adamw8bit":
        return Optimizer(name, functools.partial(adamw8bit_init, paged=paged), adamw8bit_update_)
    return Optimizer(name, adamw_init, adamw_update_)


__all__ = ["AdamW8bitState", "AdamWHyper", "AdamWState", "Optimizer", "adamw8bit_init", "adamw8bit_update_",
           "adamw_init", "adamw_update_", "clip_by_global_norm_", "global_norm", "lr_at", "no_decay_names", "optimizer",
           "state_bytes"]
