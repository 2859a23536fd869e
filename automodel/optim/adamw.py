"""AdamW over dicts of tensors, with foreach ops, updating in place ("donated" buffers, as in JAX).

The arithmetic follows torch.optim.AdamW(foreach=True) op for op, so the two agree bit for bit. Like torch's
optimizer and unlike a pure function, the update writes into the parameter and moment tensors it is given and
returns them: a training state is not to be used after its step (clone it first if it is needed). Updating in
place, a bounded group of tensors at a time, keeps the optimizer's peak near 4x the trainable bytes (weights,
gradients, two moments) instead of 11x.
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
    fused: bool = False  # torch's fused AdamW kernel (not bit-identical to the foreach arithmetic)


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


# Elements updated per group of foreach ops: the update's one temporary (the denominators) is this big at most,
# and each group's gradients are freed once it is done, so the peak stays near 4x the trainable bytes.
GROUP_ELEMENTS = 1 << 25


def adamw_update_(params: Tensors, grads: Tensors, state: AdamWState, lr: float,
                  hp: AdamWHyper) -> tuple[Tensors, AdamWState]:
    """One AdamW step in place: `params` and the moments of `state` are updated where they are and returned (with
    the count advanced). `grads` is consumed: the dict is emptied group by group, so each gradient is freed once it
    has been used (the caller should hold no other reference to them)."""
    count = state.count + 1
    names = list(params)
    if hp.fused:
        p = [params[k] for k in names]
        g = [grads.pop(k).float() for k in names]
        _fused(p, g, [state.exp_avg[k] for k in names], [state.exp_avg_sq[k] for k in names], names, count, lr, hp)
    else:
        for group in _groups(names, params):
            _foreach_step(params, {k: grads.pop(k).float() for k in group}, state, group, count, lr, hp)
    return params, AdamWState(count=count, exp_avg=state.exp_avg, exp_avg_sq=state.exp_avg_sq)


def _groups(names: list[str], params: Tensors) -> list[list[str]]:
    groups, size = [[]], 0
    for k in names:
        if groups[-1] and size + params[k].numel() > GROUP_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += params[k].numel()
    return groups


def _foreach_step(params: Tensors, grads: Tensors, state: AdamWState, names: list[str], count: int, lr: float,
                  hp: AdamWHyper) -> None:
    """torch.optim.AdamW(foreach=True)'s arithmetic on the tensors `names` (elementwise: grouping changes nothing)."""
    p = [params[k] for k in names]
    g = [grads.pop(k) for k in names]
    exp_avg = [state.exp_avg[k] for k in names]
    exp_avg_sq = [state.exp_avg_sq[k] for k in names]
    # Low-precision weights without float32 masters: the arithmetic runs on float32 copies, rounded once at the end.
    work = p if all(x.dtype == torch.float32 for x in p) else [x.float() for x in p]
    beta1, beta2 = hp.betas
    if hp.weight_decay != 0:
        decayed = [x for x, k in zip(work, names) if k not in hp.no_decay]
        if decayed:
            torch._foreach_mul_(decayed, 1 - lr * hp.weight_decay)
    torch._foreach_lerp_(exp_avg, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, g, g, 1 - beta2)
    del g  # the gradients go before the denominators are made
    step_size = -lr / (1 - beta1 ** count)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, math.sqrt(1 - beta2 ** count))
    torch._foreach_add_(denom, hp.eps)
    torch._foreach_addcdiv_(work, exp_avg, denom, step_size)
    if work is not p:
        torch._foreach_copy_(p, work)


def _fused(p: list, g: list, exp_avg: list, exp_avg_sq: list, names: list[str], count: int, lr: float,
           hp: AdamWHyper) -> None:
    steps = [torch.tensor(float(count), device=x.device) for x in p]
    for decay in (True, False):
        idx = [i for i, k in enumerate(names) if (k not in hp.no_decay) == decay]
        if not idx:
            continue
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        torch._fused_adamw_(pick(p), pick(g), pick(exp_avg), pick(exp_avg_sq), [], pick(steps), lr=lr,
                            beta1=hp.betas[0], beta2=hp.betas[1], weight_decay=hp.weight_decay if decay else 0.0,
                            eps=hp.eps, amsgrad=False, maximize=False)


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, as torch.nn.utils.clip_grad_norm_ computes it."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))


def clip_by_global_norm_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scales `grads` in place to a global norm of at most `max_norm`, as torch.nn.utils.clip_grad_norm_ does, and
    returns the norm before clipping. max_norm = 0 leaves them unchanged (and still returns their norm)."""
    norm = global_norm(grads)
    if max_norm > 0:
        torch._foreach_mul_(list(grads), torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm
