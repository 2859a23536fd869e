"""Muon over dicts of tensors, in place: torch.optim.Muon's arithmetic on the hidden weight matrices, AdamW
(optim/adamw.py) on everything else (embeddings, the output head, norms, biases), as Muon's authors and torch's docs
prescribe.

For each hidden matrix W with gradient G and momentum buffer B:

    B <- lerp(B, G, 1 - momentum)                  (B = momentum * B + (1 - momentum) * G)
    U <- lerp(G, B, momentum) if nesterov else B
    O <- NewtonSchulz5(U)                          (about U V^T of U's SVD, in bfloat16)
    W <- W * (1 - lr * weight_decay) - lr * adjust(shape) * O

op for op as torch.optim.Muon does it (tests/optim/test_muon.py checks them bit for bit). One learning-rate schedule
drives both halves: at each step Muon's rate is `muon_lr` times the schedule's rate over its peak (optim.lr).
"""

import math

import attrs
import torch
from torch import nn

from automodel.optim.adamw import AdamWHyper, Tensors, _foreach_step, _groups

# Keller Jordan's quintic Newton-Schulz coefficients (torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


@attrs.frozen
class MuonHyper:
    matrices: frozenset[str]  # the names Muon updates; AdamW updates the rest
    lr: float = 0.02  # Muon's peak learning rate
    peak_lr: float = 1e-3  # AdamW's peak (optim.lr): the schedule's rate over it scales `lr`
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: str = "original"  # "original": sqrt(max(1, rows/cols)); "match_rms_adamw": 0.2 * sqrt(max(rows, cols))


@attrs.frozen
class MuonState:
    count: int  # updates applied so far
    momentum: Tensors  # Muon's matrices: float32 momentum buffers
    exp_avg: Tensors  # the rest: AdamW's moments
    exp_avg_sq: Tensors


def hidden_matrices(model: nn.Module, names: "list[str] | set[str]") -> frozenset[str]:
    """Of the trainable `names`, the 2-D weights of the hidden layers: not the input embeddings nor the output head
    (nor adapters on them), whose rows are looked up or scored one token at a time rather than mixed."""
    excluded = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        for prefix, candidate in model.named_modules(remove_duplicate=False):
            if candidate is module:
                excluded.append(prefix + ".")
        for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: every alias of theirs
            if any(p is q for q in module.parameters()):
                excluded.append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    return frozenset(n for n in names if params[n].ndim == 2
                     and not any(n == e or (e.endswith(".") and n.startswith(e)) for e in excluded))


def muon_init(params: Tensors, hp: MuonHyper) -> MuonState:
    """Zero momentum for the matrices and zero AdamW moments for the rest, all float32."""
    zeros = lambda keep: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items() if keep(k)}  # noqa
    return MuonState(count=0, momentum=zeros(lambda k: k in hp.matrices),
                     exp_avg=zeros(lambda k: k not in hp.matrices), exp_avg_sq=zeros(lambda k: k not in hp.matrices))


def newton_schulz(update: torch.Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal factor of `update` (2-D), in bfloat16: the
    iteration is normalised so that its singular values land in about (0.7, 1.2), not exactly 1, which its authors
    found trains as well."""
    a, b, c = coefficients
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:  # iterate on the wide side: X X^T is the smaller Gram matrix
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def adjusted_lr(lr: float, shape: torch.Size, how: str) -> float:
    """Muon's rate for a matrix of `shape`: scaled so that the orthogonalised update's RMS is the same across shapes
    ("original", Keller Jordan's) or matches AdamW's ("match_rms_adamw", Moonshot's: AdamW's lr and decay carry over)."""
    rows, cols = shape[:2]
    return lr * (math.sqrt(max(1, rows / cols)) if how == "original" else 0.2 * math.sqrt(max(rows, cols)))


def muon_update_(params: Tensors, grads: Tensors, state: MuonState, lr: float, hp: AdamWHyper,
                 muon: MuonHyper) -> tuple[Tensors, MuonState]:
    """One step in place: Muon on `muon.matrices`, AdamW (at `lr`, with `hp`) on the rest. `grads` is consumed, as
    in adamw_update_. Weight decay (hp.weight_decay) applies to the matrices and to AdamW's decayed names."""
    count = state.count + 1
    muon_lr = muon.lr * (lr / muon.peak_lr)  # the schedule's factor (exactly 1.0 at its peak)
    for name in [k for k in params if k in muon.matrices]:
        p, g, buf = params[name], grads.pop(name).float(), state.momentum[name]
        work = p if p.dtype == torch.float32 else p.float()
        buf.lerp_(g, 1 - muon.momentum)
        update = g.lerp(buf, muon.momentum) if muon.nesterov else buf
        orthogonal = newton_schulz(update, muon.ns_steps)
        del g, update
        work.mul_(1 - muon_lr * hp.weight_decay)
        work.add_(orthogonal, alpha=-adjusted_lr(muon_lr, p.shape, muon.adjust_lr))
        if work is not p:
            p.copy_(work)
    rest = [k for k in params if k not in muon.matrices]
    for group in _groups(rest, params):  # _foreach_step reads the state's exp_avg and exp_avg_sq, as AdamW's
        _foreach_step(params, {k: grads.pop(k).float() for k in group}, state, group, count, lr, hp)
    return params, attrs.evolve(state, count=count)

