"""Next-token cross-entropy as (summed loss, label tokens): from whole logits, or from hidden states in chunks."""

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """`labels` (aligned with the inputs, the Hugging Face convention) shifted one to the left, IGNORE_INDEX at the
    end: position t is trained to predict targets[:, t]. Shifting the labels rather than slicing the logits keeps
    logits and hidden states whole; the backward of a slice would zero-fill and copy a logits-sized tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The number of positions the cross-entropy sums over (a 0-d device tensor: reading it syncs a GPU)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat (batch x time) positions whose next-token target is trained. Computed where the labels are: on the
    host before the batch moves to the device, it costs no device sync."""
    return (next_token_targets(labels).reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions whose target is not IGNORE_INDEX, and how many there are.
    Computed in float32 whatever the logits' dtype (a float32 copy of the whole logits)."""
    targets = next_token_targets(labels)
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def _chunk_loss(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(project(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                          chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of `project(hidden)` against `targets` (every one trained), `chunk_tokens` rows at a
    time. Each chunk's logits exist only while its loss is computed: the backward recomputes them (a non-reentrant
    checkpoint), so the peak is a few (chunk x vocab) float32 buffers however long the batch is."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    recompute = torch.is_grad_enabled()
    # split (not slicing): its backward concatenates the chunks' gradients once instead of zero-filling per chunk.
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if recompute:
            total = total + checkpoint(_chunk_loss, project, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(project, h, t)
    return total


def linear_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                         chunk_tokens: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_cross_entropy(project(hidden), labels)` without the whole logits: only the trained positions
    (`index`, from `target_index`; computed here when not given, which syncs a GPU) are projected, in chunks."""
    if index is None:
        index = target_index(labels)
    index = index.to(hidden.device)
    targets = next_token_targets(labels).reshape(-1).index_select(0, index)
    selected = hidden.flatten(0, 1).index_select(0, index)
    return chunked_cross_entropy(selected, targets, project, chunk_tokens), (targets != IGNORE_INDEX).sum()


def _chunk_logps(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(project(hidden).float(), targets, reduction="none")


def chunked_token_logps(hidden: torch.Tensor, targets: torch.Tensor,
                        project: Callable[[torch.Tensor], torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for every row, in float32, `chunk_tokens` rows at a time; with gradients each
    chunk's logits are recomputed in the backward (as chunked_cross_entropy), so no (rows x vocab) logits persist."""
    recompute = torch.is_grad_enabled()
    out = [checkpoint(_chunk_logps, project, h, t, use_reentrant=False) if recompute else _chunk_logps(project, h, t)
           for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens))]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
