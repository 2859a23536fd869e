"""Masked token cross-entropy that returns (sum, count), so callers can normalise exactly."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions whose label is not -100, and how many there are.

    `labels` is aligned with the inputs (the Hugging Face convention); position t predicts label t+1.
    Computed in float32 whatever the logits' dtype.
    """
    shifted = labels[:, 1:]
    loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shifted != IGNORE_INDEX).sum()


def count_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The number of positions token_cross_entropy sums over."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


__all__ = ["IGNORE_INDEX", "count_label_tokens", "token_cross_entropy"]
