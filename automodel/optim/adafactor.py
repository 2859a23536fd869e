"""Adafactor over dicts of tensors, in place: torch.optim.Adafactor's arithmetic (its single-tensor form, op for op;
tests/optim/test_adafactor.py checks them bit for bit).

A matrix's second moment is kept factored, one float per row and one per column (the last two dimensions), instead
of one per element; vectors keep a whole one. No first moment: about 0 bytes of state per parameter of a large
matrix against AdamW's 8. The step size is relative: min(lr, 1/sqrt(t)) times the parameter's RMS (at least
eps2), and each update is clipped to an RMS of at most `d`. Like torch's, it reads two scalars per tensor on the
host each step (the parameter's and the update's norms).
"""

import attrs
import torch

from automodel.optim.adamw import AdamWHyper, Tensors


@attrs.frozen
class AdafactorHyper:
    beta2_decay: float = -0.8  # the second moment's decay is 1 - t^beta2_decay
    eps1: float = 0.0  # floor of the second-moment estimate's square root; 0: the parameter dtype's epsilon
    eps2: float = 1e-3  # floor of a parameter's RMS in the step size
    d: float = 1.0  # the update's RMS is clipped to this


@attrs.frozen
class AdafactorState:
    count: int  # updates applied so far
    row_var: Tensors  # tensors of 2+ dimensions: the second moment's row factor (last dimension reduced to 1)
    col_var: Tensors  # ... and its column factor (second-to-last dimension reduced to 1)
    variance: Tensors  # vectors and scalars: the whole second moment


def adafactor_init(params: Tensors) -> AdafactorState:
    """Zero factors, in each parameter's dtype (as torch's)."""
    row, col, whole = {}, {}, {}
    for name, p in params.items():
        if p.ndim > 1:
            row[name] = p.new_zeros((*p.shape[:-1], 1))
            col[name] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))
        else:
            whole[name] = torch.zeros_like(p)
    return AdafactorState(count=0, row_var=row, col_var=col, variance=whole)


def adafactor_update_(params: Tensors, grads: Tensors, state: AdafactorState, lr: float, hp: AdamWHyper,
                      factor: AdafactorHyper) -> tuple[Tensors, AdafactorState]:
    """One Adafactor step in place at `lr` (the relative step's cap, and the weight decay's rate); hp gives the
    weight decay and the names it skips. `grads` is consumed, as in adamw_update_."""
    count = state.count + 1
    one_minus_beta2 = float(count) ** factor.beta2_decay
    rho = min(lr, 1 / (float(count) ** 0.5))
    for name, p in params.items():
        g = grads.pop(name).to(p.dtype)
        eps1 = factor.eps1 or torch.finfo(p.dtype).eps
        alpha = max(factor.eps2, p.norm(2).item() / (p.numel() ** 0.5)) * rho
        decay = 0.0 if name in hp.no_decay else hp.weight_decay
        if decay != 0:
            p.mul_(1 - lr * decay)
        if g.dim() > 1:
            row, col = state.row_var[name], state.col_var[name]
            row.lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), one_minus_beta2)
            col.lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), one_minus_beta2)
            estimate = row @ col
            estimate.div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            variance = state.variance[name]
            variance.lerp_(g * g, one_minus_beta2)
            estimate = variance.clone()
        update = estimate.clamp_(min=eps1 * eps1).rsqrt_()  # eps1 squared: the square root follows
        update.mul_(g)
        del g
        clip = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * factor.d))
        p.add_(update, alpha=-alpha / clip)
    return params, attrs.evolve(state, count=count)
