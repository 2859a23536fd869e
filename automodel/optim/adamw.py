"""AdamW as a pure function over dicts of tensors, with foreach ops.

The arithmetic follows torch.optim.AdamW(foreach=True) op for op, so the two agree bit for bit; unlike it,
nothing passed in is mutated: every call returns new parameter and moment tensors.
"""

import math
from typing import Sequence

import attrs
import torch

Tensors = dict[str, torch.Tensor]


@attrs.frozen
class AdamWHyper:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: frozenset[str] = frozenset()  # names that get no weight decay (biases, norms)


@attrs.frozen
class AdamWState:
    count: int  # updates applied so far
    exp_avg: Tensors
    exp_avg_sq: Tensors


def no_decay_names(params: Tensors) -> frozenset[str]:
    """Vectors and scalars (biases, norm scales) are not decayed; matrices and embeddings are."""
    return frozenset(name for name, p in params.items() if p.ndim < 2)


def adamw_init(params: Tensors) -> AdamWState:
    """Zero moments, kept in float32 whatever the parameters' dtype."""
    zeros = lambda: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}  # noqa: E731
    return AdamWState(count=0, exp_avg=zeros(), exp_avg_sq=zeros())


def adamw_update(params: Tensors, grads: Tensors, state: AdamWState, lr: float,
                 hp: AdamWHyper) -> tuple[Tensors, AdamWState]:
    """One AdamW step; returns (new params, new state)."""
    names = list(params)
    beta1, beta2 = hp.betas
    count = state.count + 1
    p = [params[k] for k in names]
    g = [grads[k].float() for k in names]
    if hp.weight_decay != 0:
        decay = [k not in hp.no_decay for k in names]
        scaled = torch._foreach_mul([x for x, d in zip(p, decay) if d], 1 - lr * hp.weight_decay)
        it = iter(scaled)
        p = [next(it) if d else x for x, d in zip(p, decay)]
    exp_avg = torch._foreach_lerp([state.exp_avg[k] for k in names], g, 1 - beta1)
    exp_avg_sq = torch._foreach_mul([state.exp_avg_sq[k] for k in names], beta2)
    torch._foreach_addcmul_(exp_avg_sq, g, g, 1 - beta2)  # in place on tensors made just above
    del g
    step_size = -lr / (1 - beta1 ** count)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, math.sqrt(1 - beta2 ** count))
    torch._foreach_add_(denom, hp.eps)
    if all(x.dtype == torch.float32 for x in p):
        new_p = torch._foreach_addcdiv(p, exp_avg, denom, step_size)
    else:  # low-precision weights: update in float32, then round once
        new_p = [y.to(x.dtype) for x, y in zip(p, torch._foreach_addcdiv([x.float() for x in p], exp_avg,
                                                                           denom, step_size))]
    return (dict(zip(names, new_p)),
            AdamWState(count=count, exp_avg=dict(zip(names, exp_avg)), exp_avg_sq=dict(zip(names, exp_avg_sq))))


def clip_by_global_norm(grads: Sequence[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(clipped grads, the norm before clipping), as torch.nn.utils.clip_grad_norm_ computes them.
    max_norm = 0 returns the grads unchanged (and still their norm)."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
    if max_norm <= 0:
        return list(grads), norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return torch._foreach_mul(list(grads), coef), norm
