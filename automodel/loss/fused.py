"""The chunked cross-entropy with its gradients computed in the forward pass (the technique of Liger's fused linear
cross-entropy and Apple's cut-cross-entropy).

The recomputing path (cross_entropy.chunked_cross_entropy) projects each chunk of hidden states to logits twice: once
in the forward for the loss, and again in the backward (a checkpoint) to get the gradients: four head matmuls a
chunk. Here each chunk's loss and its gradients with respect to the hidden states, the head's weight and bias are
computed at once, in the forward, and kept; the backward only scales them by the incoming gradient: three head
matmuls a chunk, and still no (tokens x vocab) logits beyond one chunk's.

What it costs: the head weight's gradient (vocab x hidden, accumulated in float32) and the hidden states' (tokens x
hidden) are held from the loss's forward until the model's backward reaches them. What it needs: the loss to be a sum
whose gradient is one number (the normalised sum a step takes), a Linear head (weight, optional bias) and a logits
transform (soft-capping, a scale) that autograd can differentiate; anything else takes the recomputing path.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from automodel.loss.cross_entropy import chunked_cross_entropy

Transform = Callable[[torch.Tensor], torch.Tensor]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                transform: Transform, chunk_tokens: int) -> torch.Tensor:
        # Only the gradients the graph asks for (a frozen head's weight: none; a LoRA run's head is frozen).
        wanted = [hidden, weight, bias]
        need = [x is not None and ctx.needs_input_grad[i] for i, x in enumerate(wanted)]
        grads = [torch.empty_like(hidden) if need[0] else None,
                 *(torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need[i] else None
                   for i, x in ((1, weight), (2, bias)))]
        w = weight.detach().requires_grad_(need[1])
        b = bias.detach().requires_grad_(need[2]) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        start = 0
        with torch.enable_grad():
            for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
                h = h.detach().requires_grad_(need[0])
                loss = F.cross_entropy(transform(F.linear(h, w, b)).float(), t, reduction="sum")
                inputs = [x for x, n in zip((h, w, b), need) if n]
                got = iter(torch.autograd.grad(loss, inputs) if inputs else ())
                if need[0]:
                    grads[0][start:start + len(h)] = next(got)
                for i in (1, 2):
                    if need[i]:
                        grads[i] += next(got)
                total = total + loss.detach()
                start += len(h)
        # Kept on ctx, not save_for_backward: they are results, not activations, so activation offloading's
        # saved-tensor hooks (train.activation_offloading) should not move a head-sized gradient to the host.
        ctx.grads = [g.to(x.dtype) if g is not None else None for g, x in zip(grads, wanted)]
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grads, ctx.grads = ctx.grads, None  # ours alone: scaled in place, no second head-sized buffer
        return (*(g.mul_(grad_total.to(g.dtype)) if g is not None else None for g in grads), None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               targets: torch.Tensor, transform: Transform, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of transform(hidden @ weight.T + bias) against `targets` (every one trained),
    `chunk_tokens` rows at a time, its gradients computed as it goes (no recompute in the backward). Without
    gradients it is the plain chunked sum."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        with torch.no_grad():  # nothing to differentiate: the chunked sum, nothing recomputed
            return chunked_cross_entropy(hidden, targets, lambda h: transform(F.linear(h, weight, bias)), chunk_tokens)
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, transform, chunk_tokens)
