"""What a config's dtype names mean, and how many elements a parameter has however it is stored."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Every from_pretrained here: no Hugging Face hub kernels. From transformers 5.25 (with the `kernels` package it
# installs) a loaded model swaps layers for kernels fetched from the hub unless told not to: code from the network,
# other numerics than the model's own layers, and a re-kernelisation on each train()/eval() that fails while the
# functional backend holds the weights (they are on the meta device then).
HF_LOAD = {"use_kernels": False}


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (then `ds_numel` holds the size) or
    bitsandbytes has packed it into 4 bits (its quant_state holds the shape)."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return getattr(p, "ds_numel", p.numel())
