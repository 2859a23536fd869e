"""Activation offloading: while the forward runs, each tensor autograd saves for the backward is copied to host
memory (pinned on CUDA) and copied back when the backward unpacks it (torch.autograd.graph.save_on_cpu's rule).

Weights are left where they are (they stay on the device anyway: copying them would only add traffic), and so are
tensors already in host memory. With activation checkpointing, a checkpointed layer saves only its inputs (torch's
non-reentrant checkpoint saves them through the same hooks), so the layers' inputs are what moves; the recompute
inside the backward saves its tensors on the device as usual. The copies are synchronous: no stream overlap.
"""

from typing import Any

import torch
from torch import nn


class Offloaded(torch.autograd.graph.saved_tensors_hooks):
    """A context for the forward of `model`; `moved_bytes` counts what went to host memory (on a CPU-only machine
    nothing needs to move, and it counts what would have)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.moved_bytes = 0
        pin = device.type == "cuda"
        weights = {p.data_ptr() for p in model.parameters() if p.device.type != "meta"}

        def pack(tensor: torch.Tensor) -> Any:
            if isinstance(tensor, nn.Parameter) or tensor.data_ptr() in weights:
                return tensor
            self.moved_bytes += tensor.numel() * tensor.element_size()
            if tensor.device.type == "cpu":
                return tensor  # already in host memory
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
            packed.copy_(tensor)
            return tensor.device, packed

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, tensor = packed
            return tensor.to(device, non_blocking=pin)

        super().__init__(pack, unpack)

    def __enter__(self) -> "Offloaded":
        super().__enter__()
        return self
