"""The next step's batches, made in a background thread while the current step runs.

`make(step)` gives a step's host micro-batches and, for streamed data, the stream position after them. Steps are
asked for in order, one ahead, so a stream is read in the order it is trained on; for data read in full a step's
batches are a function of the step (batches.planned), so resume is unchanged. Only when the collation happens moves. On
CUDA the host batches are pinned, so their copies to the device (`non_blocking=True`) overlap too.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from automodel.training.forward import Batch, host_ready

StepData = tuple[list[Batch], Optional[dict]]  # a step's host micro-batches, the stream position after them


class Prefetcher:
    def __init__(self, make: Callable[[int], StepData], max_steps: int, pin: bool = False):
        self.make, self.max_steps, self.pin = make, max_steps, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="automodel-prefetch")
        self._next: Optional[tuple[int, Future]] = None

    def _make(self, step: int) -> StepData:
        batches, position = self.make(step)
        return [host_ready(b, self.pin) for b in batches], position

    def get(self, step: int) -> StepData:
        """The host micro-batches of `step` (made now unless they were made in the background) and the stream
        position after them; the next step's are started in the background."""
        if self._next is not None and self._next[0] == step:
            made = self._next[1].result()
        else:
            made = self._make(step)
        self._next = (step + 1, self._pool.submit(self._make, step + 1)) if step + 1 < self.max_steps else None
        return made

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None
