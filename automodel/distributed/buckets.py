"""Gradient all-reduce overlapped with the backward: float32 buckets, each launched as soon as its gradients exist.

The backward produces gradients roughly from the last layer to the first, so the tensors are assigned to buckets in
reverse order of the model's parameters (as torch DDP does). A bucket's all-reduce starts, asynchronously, once all
its gradients have arrived and every earlier bucket has started: the assignment and the launch order are the same on
every rank, whatever order the backward runs in, so the collectives always pair up. `finish` zero-fills what never
arrived (a weight the batch did not use), launches what is left, waits, and returns the summed gradients in order.
"""

from typing import Optional

import torch
import torch.distributed as dist


class GradBuckets:
    """One step's reduction. Gradients come in through `add(i, grad)` (tensor i of `shapes`, any float dtype; the
    running float32 sum of earlier micro-batches' gradients in `earlier`, if any, is added first); `finish()` returns
    the float32 sums over ranks, views into the buckets."""

    def __init__(self, shapes: list[torch.Size], device: torch.device, bucket_bytes: int,
                 earlier: Optional[list[torch.Tensor]] = None):
        self.earlier = earlier
        self.where: list[tuple[int, int]] = [(0, 0)] * len(shapes)  # tensor -> (bucket, offset)
        sizes: list[int] = []
        members: list[list[int]] = []
        limit = max(1, bucket_bytes // 4)
        for i in reversed(range(len(shapes))):
            n = shapes[i].numel()
            if not sizes or (sizes[-1] + n > limit and sizes[-1] > 0):
                sizes.append(0)
                members.append([])
            self.where[i] = (len(sizes) - 1, sizes[-1])
            members[-1].append(i)
            sizes[-1] += n
        self.shapes = shapes
        self.flats = [torch.empty(n, dtype=torch.float32, device=device) for n in sizes]
        self.members = members
        self.missing = [len(m) for m in members]
        self.arrived = [False] * len(shapes)
        self.handles: list = []

    def view(self, i: int) -> torch.Tensor:
        bucket, offset = self.where[i]
        return self.flats[bucket][offset:offset + self.shapes[i].numel()].view(self.shapes[i])

    def add(self, i: int, grad: torch.Tensor) -> None:
        slot = self.view(i)
        if self.earlier is not None:
            slot.copy_(self.earlier[i]).add_(grad)
            self.earlier[i] = None  # its memory is the bucket's now
        else:
            slot.copy_(grad)
        self.arrived[i] = True
        bucket = self.where[i][0]
        self.missing[bucket] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while len(self.handles) < len(self.flats) and self.missing[len(self.handles)] == 0:
            self.handles.append(dist.all_reduce(self.flats[len(self.handles)], async_op=True))

    def finish(self) -> list[torch.Tensor]:
        for i, done in enumerate(self.arrived):
            if not done:  # no gradient this step: zero (plus what earlier micro-batches gave it)
                self.add(i, torch.zeros((), dtype=torch.float32, device=self.flats[0].device))
        for handle in self.handles:
            handle.wait()
        return [self.view(i) for i in range(len(self.shapes))]
