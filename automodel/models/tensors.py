"""What a config's dtype names mean, and how many elements a parameter has however it is stored."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (then `ds_numel` holds the size) or
    bitsandbytes has packed it into 4 bits (its quant_state holds the shape)."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return getattr(p, "ds_numel", p.numel())
