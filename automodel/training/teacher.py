"""Frozen models as a loss sees them (a distillation teacher, a preference reference): the model, how to run it,
and its output head."""

from typing import Any, Callable, Optional

import attrs
import torch
from torch import nn

RunModel = Callable[[dict], Any]  # forward keyword arguments -> the model's output


@attrs.frozen
class FrozenModel:
    model: nn.Module  # eval mode, no gradients, in the dtype it runs in
    run: RunModel  # its forward (through its DeepSpeed engine under ZeRO-3, so the hooks gather its weights)
    dtype: torch.dtype
    # The output head's whole weight and bias for one micro-batch, called once per micro-batch on every rank (a
    # gather under ZeRO-3).
    head_weights: Callable[[], tuple[torch.Tensor, Optional[torch.Tensor]]]


@attrs.frozen
class Teacher(FrozenModel):
    """A distillation teacher: a frozen model and the mix of [distill]."""

    alpha: float
    temperature: float


def local_head_weights(model: nn.Module) -> Callable[[], tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """A head whose weight every rank holds whole (no ZeRO-3): the tensors themselves, no copy."""
    head = model.get_output_embeddings()
    return lambda: (head.weight.detach(), None if head.bias is None else head.bias.detach())


__all__ = ["FrozenModel", "RunModel", "Teacher", "local_head_weights"]
