"""`logging.profile_steps = [first, last]`: a torch.profiler trace of those steps, one file per rank."""

from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler


class StepProfiler:
    """Starts before step `first`, stops after step `last` (or when the loop ends) and writes
    `<directory>/rank<R>.<time>.pt.trace.json`, each step a span named "step N": TensorBoard's profiler plugin (`tensorboard --logdir <directory>`)
    and Perfetto (ui.perfetto.dev) both read it."""

    def __init__(self, first: int, last: int, directory: Path, rank: int, log: Callable[[str], None]):
        self.first, self.last, self.directory, self.rank, self.log = first, last, Path(directory), rank, log
        self._prof: Optional[profile] = None
        self._span: Optional[record_function] = None  # "step N" in the trace, around each traced step
        self.written: Optional[Path] = None

    def before_step(self, step: int) -> None:
        if self._prof is None and self.written is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._prof.__enter__()
            self._started = step
        if self._prof is not None:
            self._span = record_function(f"step {step}")
            self._span.__enter__()

    def after_step(self, step: int) -> None:
        self._ended = step
        if self._span is not None:
            span, self._span = self._span, None
            span.__exit__(None, None, None)
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self._prof is None:
            return
        if self._span is not None:  # the loop ended inside a step
            span, self._span = self._span, None
            span.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        before = set(self.directory.iterdir())
        tensorboard_trace_handler(str(self.directory), worker_name=f"rank{self.rank}")(prof)
        new = sorted(set(self.directory.iterdir()) - before)
        self.written = new[0] if new else self.directory
        self.log(f"profile: steps {self._started}-{self._ended} traced to {self.written} (open with "
                 f"`tensorboard --logdir {self.directory}` or ui.perfetto.dev)")
