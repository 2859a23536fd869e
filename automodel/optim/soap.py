"""SOAP over dicts of tensors, in place: Adam run in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024,
"SOAP: Improving and Stabilizing Shampoo using Adam"), the arithmetic of the authors' implementation as
pytorch-optimizer ships it (`pytorch_optimizer.SOAP`; tests/optim/test_soap.py checks the two step for step).

For a matrix W (m x n) with gradient G, SOAP keeps Shampoo's statistics L = E[G G^T] (m x m) and R = E[G^T G]
(n x n) and their eigenvectors Q_L, Q_R. Adam's second moment lives in the rotated space G' = Q_L^T G Q_R, so the
preconditioning is Shampoo's while the step is Adam's:

    M <- lerp(M, G, 1 - beta1)                  (first moment, unrotated)
    V <- lerp(V, G'^2, 1 - beta2)               (second moment, rotated)
    W <- W - lr_t * Q_L ((Q_L^T M Q_R) / (sqrt(V) + eps)) Q_R^T ;  W <- W * (1 - lr * weight_decay)
    L, R <- lerp(L, G G^T, 1 - shampoo_beta), lerp(R, G^T G, 1 - shampoo_beta)

and every `precondition_frequency` steps Q_L, Q_R are refreshed by one step of power iteration and a QR
decomposition (an eigendecomposition the first time). A dimension larger than `max_precondition_dim` (a large
vocabulary's) is left unrotated; vectors (biases, norms) get plain Adam. The first step only gathers statistics.
State: 8 bytes per parameter (Adam's) plus, per matrix, m^2 + n^2 floats twice (statistics and bases).
"""

import math
from itertools import chain

import attrs
import torch

from automodel.optim.adamw import AdamWHyper, Tensors


@attrs.frozen
class SoapHyper:
    shampoo_beta: float = -1.0  # decay of the preconditioner's statistics; < 0: beta2
    precondition_frequency: int = 10  # steps between refreshes of the eigenbases
    max_precondition_dim: int = 10000  # larger dimensions are not rotated


@attrs.frozen
class SoapState:
    count: int  # steps taken (the first only gathers statistics)
    exp_avg: Tensors
    exp_avg_sq: Tensors
    statistics: Tensors  # "<name>#<dim>": the running E[G G^T] along that dimension
    bases: Tensors  # "<name>#<dim>": its eigenvectors (largest eigenvalue first) as rows: Q^T, so that Q = .T is
    #                 column-major, as LAPACK returns it (the matmuls round as the reference's do) after a resume too


def soap_init(params: Tensors, hp: SoapHyper) -> SoapState:
    """Zero moments and statistics (float32, or the parameter's dtype if wider); the bases come with the first
    gradient, so they are allocated here (as identities) for a checkpoint's tables to be complete."""
    zeros = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    stats, bases = {}, {}
    for name, p in params.items():
        for dim in _rotated_dims(p, hp):
            size = p.shape[dim]
            stats[f"{name}#{dim}"] = torch.zeros(size, size, device=p.device)
            bases[f"{name}#{dim}"] = torch.eye(size, device=p.device)
    return SoapState(count=0, exp_avg=zeros, exp_avg_sq={k: v.clone() for k, v in zeros.items()}, statistics=stats,
                     bases=bases)


def _rotated_dims(p: torch.Tensor, hp: SoapHyper) -> list[int]:
    if p.ndim < 2:
        return []
    return [d for d, size in enumerate(p.shape) if size <= hp.max_precondition_dim]


def _project(x: torch.Tensor, bases: list, backward: bool = False) -> torch.Tensor:
    """x rotated into the bases' space (or back): each dimension in turn contracted with its basis (or, without
    one, cycled to the end unchanged), as the reference's `project` does."""
    for q in bases:
        if q is None:
            x = x.permute([*range(1, x.ndim), 0])
        else:
            x = torch.tensordot(x, q, dims=[[0], [1 if backward else 0]])
    return x


def _basis(state: SoapState, key: str) -> "torch.Tensor | None":
    stored = state.bases.get(key)
    return None if stored is None else stored.T


def _accumulate(g: torch.Tensor, name: str, state: SoapState, hp: SoapHyper, beta: float) -> None:
    for dim in _rotated_dims(g, hp):
        others = [*chain(range(dim), range(dim + 1, g.ndim))]
        state.statistics[f"{name}#{dim}"].lerp_(torch.tensordot(g, g, dims=[others, others]), weight=1.0 - beta)


def _eigenbases(name: str, p: torch.Tensor, state: SoapState, hp: SoapHyper) -> None:
    """The statistics' eigenvectors, largest eigenvalue first (the first time)."""
    for dim in _rotated_dims(p, hp):
        m = state.statistics[f"{name}#{dim}"]
        _, q = torch.linalg.eigh(m + 1e-30 * torch.eye(m.shape[0], device=m.device, dtype=m.dtype))
        state.bases[f"{name}#{dim}"].copy_(torch.flip(q, dims=[1]).T)


def _refresh_bases(name: str, p: torch.Tensor, state: SoapState, hp: SoapHyper) -> None:
    """One power-iteration step and a QR per rotated dimension; the second moment's entries are reordered to follow
    their eigenvalues' new order."""
    exp_avg_sq = state.exp_avg_sq[name]
    for dim in _rotated_dims(p, hp):
        m, q = state.statistics[f"{name}#{dim}"], state.bases[f"{name}#{dim}"].T
        product = m @ q
        order = torch.argsort((q * product).sum(dim=0), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(dim, order)
        fresh, _ = torch.linalg.qr(product.index_select(1, order).to(torch.float32))
        q.copy_(fresh)  # into the stored Q^T's transpose view
    state.exp_avg_sq[name].copy_(exp_avg_sq)


def soap_update_(params: Tensors, grads: Tensors, state: SoapState, lr: float, hp: AdamWHyper,
                 soap: SoapHyper) -> tuple[Tensors, SoapState]:
    """One SOAP step in place (Adam's betas, eps and weight decay from `hp`); `grads` is consumed."""
    count = state.count + 1
    beta1, beta2 = hp.betas
    shampoo_beta = beta2 if soap.shampoo_beta < 0 else soap.shampoo_beta
    for name, p in params.items():
        g = grads.pop(name).float()
        if count == 1:  # the statistics' first gradient, and the bases from them
            _accumulate(g, name, state, soap, shampoo_beta)
            _eigenbases(name, p, state, soap)
            continue
        step = count - 1
        step_size = lr * (math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step))  # the reference's order
        bases = [_basis(state, f"{name}#{d}") for d in range(p.ndim)] if p.ndim > 1 else []
        exp_avg, exp_avg_sq = state.exp_avg[name], state.exp_avg_sq[name]
        exp_avg.lerp_(g, weight=1.0 - beta1)
        exp_avg_sq.lerp_(_project(g, bases).square(), weight=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(hp.eps)
        update = _project(_project(exp_avg, bases) / denom, bases, backward=True)
        work = p if p.dtype == torch.float32 else p.float()
        work.add_(update, alpha=-step_size)
        decay = 0.0 if name in hp.no_decay else hp.weight_decay
        if decay > 0:
            work.mul_(1.0 - decay * lr)
        if work is not p:
            p.copy_(work)
        _accumulate(g, name, state, soap, shampoo_beta)
        if step % soap.precondition_frequency == 0:
            _refresh_bases(name, p, state, soap)
    return params, attrs.evolve(state, count=count)
