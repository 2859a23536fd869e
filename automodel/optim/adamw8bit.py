"""8-bit AdamW over dicts of tensors: bitsandbytes' AdamW8bit arithmetic, its state held in the training state.

The moments of each tensor of at least MIN_8BIT_SIZE elements are stored as uint8 codes, blockwise (256 elements
per block, each block with a float32 scale, `absmax`) against bitsandbytes' dynamic quantisation maps: 2 bytes of
state per parameter instead of AdamW's 8. Smaller tensors (biases, norms) keep float32 moments, as bitsandbytes
does. Each update is one call of the kernel that bitsandbytes.optim.AdamW8bit runs, with the same arguments, so the
two agree bit for bit (tests/optim/test_adamw8bit.py). Like optim/adamw.py, it updates in place and returns the
tensors it was given.
"""

from typing import Any

import attrs
import torch

from automodel.optim.adamw import AdamWHyper, Tensors

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep float32 moments
BLOCK = 256  # elements per quantisation block
PAGED_MIN = 100_000  # bitsandbytes pages only buffers of at least this many elements


@attrs.frozen
class AdamW8bitState:
    count: int  # updates applied so far
    exp_avg: Tensors  # uint8 codes (8-bit tensors) or float32 moments (small tensors)
    exp_avg_sq: Tensors
    absmax1: Tensors  # per-block scales of exp_avg, 8-bit tensors only
    absmax2: Tensors  # per-block scales of exp_avg_sq


def _functional() -> Any:
    import bitsandbytes.functional as F

    return F


def _zeros(p: torch.Tensor, dtype: torch.dtype, paged: bool) -> torch.Tensor:
    """A state buffer as bitsandbytes allocates it: in paged (unified) memory for large CUDA tensors when paged."""
    if paged and p.device.type == "cuda" and p.numel() >= PAGED_MIN:
        F = _functional()
        buf = F.get_paged(*p.shape, dtype=dtype, device=p.device)
        F.fill(buf, 0)
        return buf
    return torch.zeros_like(p, dtype=dtype, device=p.device)


def adamw8bit_init(params: Tensors, paged: bool = False) -> AdamW8bitState:
    """Zero moments: uint8 codes with zero scales for large tensors, float32 for the rest."""
    exp_avg, exp_avg_sq, absmax1, absmax2 = {}, {}, {}, {}
    for name, p in params.items():
        small = p.numel() < MIN_8BIT_SIZE
        dtype = torch.float32 if small else torch.uint8
        exp_avg[name], exp_avg_sq[name] = _zeros(p, dtype, paged), _zeros(p, dtype, paged)
        if not small:
            blocks = -(-p.numel() // BLOCK)
            absmax1[name] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            absmax2[name] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
    return AdamW8bitState(count=0, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, absmax1=absmax1, absmax2=absmax2)


_QMAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _qmaps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' signed (first moment) and unsigned (second moment) dynamic maps, made once per device."""
    if device not in _QMAPS:
        F = _functional()
        _QMAPS[device] = (F.create_dynamic_map(signed=True).to(device), F.create_dynamic_map(signed=False).to(device))
    return _QMAPS[device]


def adamw8bit_update_(params: Tensors, grads: Tensors, state: AdamW8bitState, lr: float,
                      hp: AdamWHyper) -> tuple[Tensors, AdamW8bitState]:
    """One 8-bit AdamW step in place (`hp.fused` does not apply). `grads` is consumed as in adamw_update_."""
    F = _functional()
    count = state.count + 1
    beta1, beta2 = hp.betas
    for name, p in params.items():
        g = grads.pop(name).to(p.dtype).contiguous()
        decay = 0.0 if name in hp.no_decay else hp.weight_decay
        m, v = state.exp_avg[name], state.exp_avg_sq[name]
        if m.dtype == torch.float32:
            F.optimizer_update_32bit("adam", g, p, m, beta1, hp.eps, count, lr, v, beta2, 0.0, 0.0, decay, 1.0,
                                     None, max_unorm=0.0, skip_zeros=False)
        else:
            qmap1, qmap2 = _qmaps(p.device)
            F.optimizer_update_8bit_blockwise("adam", g, p, m, v, beta1, beta2, 0.0, 0.0, hp.eps, count, lr, qmap1,
                                              qmap2, state.absmax1[name], state.absmax2[name], decay,
                                              gnorm_scale=1.0, skip_zeros=False)
        del g
    return params, attrs.evolve(state, count=count)


def state_bytes(state: Any) -> int:
    """Bytes of an optimizer state's tensors (any of optim/'s states: their tables of tensors)."""
    tables = [v for v in attrs.asdict(state, recurse=False).values() if isinstance(v, dict)]
    return sum(t.numel() * t.element_size() for table in tables for t in table.values())
