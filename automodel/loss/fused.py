"""Chunked losses over the output head with their gradients computed in the forward pass (the technique of Liger's
fused linear cross-entropy and Apple's cut-cross-entropy).

The recomputing path (cross_entropy.chunked_cross_entropy) projects each chunk of hidden states to logits twice: once
in the forward for the loss, and again in the backward (a checkpoint) to get the gradients: four head matmuls a
chunk. Here each chunk's loss and its gradients with respect to the hidden states and the head's parameters are
computed at once, in the forward, and kept; the backward only scales them by the incoming gradient: three head
matmuls a chunk, and still no (tokens x vocab) logits beyond one chunk's.

The head is a function of the hidden states and its parameters (`linear_head`: a Linear, or a LoRA-adapted Linear,
then the model's logits transform); the loss of a chunk is any sum of its logits against its targets (the
cross-entropy, or with a teacher's hidden states alongside, the distillation loss).

What it costs: the head parameters' gradients (accumulated in float32) and the hidden states' (tokens x hidden) are
held from the loss's forward until the model's backward reaches them. What it needs: the loss to be a sum whose
gradient is one number (the normalised sum a step takes), and a head and transform that autograd can differentiate;
anything else takes the recomputing path.
"""

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Transform = Callable[[torch.Tensor], torch.Tensor]
# (hidden chunk, *head parameters) -> logits
HeadFn = Callable[..., torch.Tensor]
# (logits chunk, targets chunk, *aligned chunks) -> summed loss (float32, 0-d)
ChunkLoss = Callable[..., torch.Tensor]


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head: HeadFn, chunk_loss: ChunkLoss, chunk_tokens: int, targets: torch.Tensor,
                aligned: tuple, hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        # Only the gradients the graph asks for (a frozen head's weight: none; LoRA's base weight: none).
        need_hidden, need = ctx.needs_input_grad[5], ctx.needs_input_grad[6:]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if n else None
                 for p, n in zip(params, need)]
        leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need)]
        wanted = [leaf for leaf, n in zip(leaves, need) if n]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        start = 0
        with torch.enable_grad():
            for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
                h = h.detach().requires_grad_(need_hidden)
                loss = chunk_loss(head(h, *leaves), t, *(a[start:start + len(h)] for a in aligned))
                inputs = ([h] if need_hidden else []) + wanted
                got = iter(torch.autograd.grad(loss, inputs) if inputs else ())
                if need_hidden:
                    grad_hidden[start:start + len(h)] = next(got)
                for i, n in enumerate(need):
                    if n:
                        grads[i] += next(got)
                total = total + loss.detach()
                start += len(h)
        # Kept on ctx, not save_for_backward: they are results, not activations, so activation offloading's
        # saved-tensor hooks (train.activation_offloading) should not move a head-sized gradient to the host.
        ctx.grads = [grad_hidden] + [g.to(p.dtype) if g is not None else None for g, p in zip(grads, params)]
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grads, ctx.grads = ctx.grads, None  # ours alone: scaled in place, no second head-sized buffer
        return (None, None, None, None, None,
                *(g.mul_(grad_total.to(g.dtype)) if g is not None else None for g in grads))


def fused_linear_loss(hidden: torch.Tensor, head: HeadFn, params: Sequence[torch.Tensor], targets: torch.Tensor,
                      chunk_tokens: int, chunk_loss: ChunkLoss = cross_entropy_sum,
                      aligned: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The sum over chunks of `chunk_loss(head(hidden chunk, *params), targets chunk, *aligned chunks)`,
    `chunk_tokens` rows at a time, its gradients (hidden states and params) computed as it goes: no recompute in
    the backward. `aligned` (rows like `hidden`, e.g. a teacher's hidden states) carry no gradient."""
    if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params)):
        return _FusedLinearLoss.apply(head, chunk_loss, chunk_tokens, targets, tuple(aligned), hidden, *params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.no_grad():  # nothing to differentiate: the chunked sum, nothing recomputed
        for start in range(0, len(hidden), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            total = total + chunk_loss(head(hidden[rows], *params), targets[rows], *(a[rows] for a in aligned))
    return total


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               targets: torch.Tensor, transform: Transform, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of transform(hidden @ weight.T + bias) against `targets` (every one trained),
    `chunk_tokens` rows at a time, its gradients computed as it goes (no recompute in the backward)."""
    head, params = _linear(transform, weight, bias)
    return fused_linear_loss(hidden, head, params, targets, chunk_tokens)


def _linear(transform: Transform, weight: torch.Tensor,
            bias: Optional[torch.Tensor]) -> tuple[HeadFn, list[torch.Tensor]]:
    """transform(F.linear(...)) as a function of its parameters (weight, and bias where there is one)."""
    if bias is None:
        return (lambda h, w: transform(F.linear(h, w))), [weight]
    return (lambda h, w, b: transform(F.linear(h, w, b))), [weight, bias]


def linear_head(module: nn.Module, transform: Transform) -> Optional[tuple[HeadFn, list[torch.Tensor]]]:
    """(head function, its parameters as the module holds them now) for a head the fused loss can differentiate:
    an nn.Linear, or peft's LoRA Linear with one active, unmerged adapter (no DoRA) over one; else None. The
    parameters are read at call time (the functional backend binds the state's tensors to the module)."""
    if type(module) is nn.Linear:
        return _linear(transform, module.weight, module.bias)
    lora = _lora_parts(module)
    if lora is None:
        return None
    base, a, b, dropout, scaling = lora
    has_bias = base.bias is not None

    def head(h: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        bias, (a_weight, b_weight) = (rest[0], rest[1:]) if has_bias else (None, rest)
        out = F.linear(h, w, bias)  # peft's order and casts: base, then the adapter's path in its own dtype
        x = dropout(h.to(a_weight.dtype))
        return transform((out + F.linear(F.linear(x, a_weight), b_weight) * scaling).to(out.dtype))

    return head, [base.weight, *([base.bias] if has_bias else []), a.weight, b.weight]


def _lora_parts(module: nn.Module):
    """(base Linear, lora_A, lora_B, dropout, scaling) of a peft LoRA Linear in the plain state; else None."""
    names = getattr(module, "active_adapters", None)
    if not names or len(names) != 1 or not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
        return None
    name = names[0]
    if (getattr(module, "merged", False) or getattr(module, "disable_adapters", False)
            or getattr(module, "use_dora", {}).get(name, False) or name not in module.lora_A
            or getattr(module, "lora_variant", {}).get(name) is not None
            or type(module.base_layer) is not nn.Linear):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    return module.base_layer, a, b, module.lora_dropout[name], module.scaling[name]
