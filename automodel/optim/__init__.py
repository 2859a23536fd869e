"""The optimizer (AdamW over dicts of tensors, in place) and pure learning-rate schedules."""

from automodel.optim.adamw import (AdamWHyper, AdamWState, adamw_init, adamw_update_, clip_by_global_norm_,
                                   global_norm, no_decay_names)
from automodel.optim.schedules import lr_at

__all__ = ["AdamWHyper", "AdamWState", "adamw_init", "adamw_update_", "clip_by_global_norm_", "global_norm", "lr_at",
           "no_decay_names"]
