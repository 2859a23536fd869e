"""The next step's batches, collated in a background thread while the current step runs.

What a step gets is still a pure function of the step (`plan.micro_batches(step, rank)`), so resume is unchanged;
only when the collation happens moves. On CUDA the host batches are pinned, so their copies to the device
(`non_blocking=True`) overlap too.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from automodel.data import BatchPlan
from automodel.training.forward import Batch, host_ready


class Prefetcher:
    def __init__(self, plan: BatchPlan, collate: Callable[[list[int]], Batch], rank: int, max_steps: int,
                 pin: bool = False):
        self.plan, self.collate, self.rank, self.max_steps, self.pin = plan, collate, rank, max_steps, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="automodel-prefetch")
        self._next: Optional[tuple[int, Future]] = None

    def _make(self, step: int) -> list[Batch]:
        return [host_ready(self.collate(idx), self.pin) for idx in self.plan.micro_batches(step, self.rank)]

    def get(self, step: int) -> list[Batch]:
        """The host micro-batches of `step` (made now unless they were made in the background), and the next step's
        started in the background."""
        if self._next is not None and self._next[0] == step:
            batches = self._next[1].result()
        else:
            batches = self._make(step)
        self._next = (step + 1, self._pool.submit(self._make, step + 1)) if step + 1 < self.max_steps else None
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None

