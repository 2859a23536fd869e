"""Stopping at a step boundary when the cluster asks (SIGUSR1 from Slurm's --signal, SIGTERM on preemption).

The handler only sets a flag; the loop checks it after each step, every rank agrees (one tiny all-reduce of a CPU
tensor over gloo, which never waits for the GPU, so all ranks stop at the same step), a checkpoint is written and the run exits with EXIT_PREEMPTED.
Running the same command again resumes from that checkpoint.
"""

import os
import signal
import sys
from typing import Optional

from automodel.distributed import any_rank
from automodel import exit_status
from automodel.exit_status import EXIT_PREEMPTED

SIGNALS = exit_status.STOP_SIGNALS


class Preempted(Exception):
    def __init__(self, step: int, signal_name: str, saved: bool = True):
        if saved:
            message = f"stopped at step {step} on {signal_name}; a checkpoint was written"
        else:  # before the first step of this process: what is on disk is all there is
            message = f"stopped before training (step {step}) on {signal_name}; nothing new to save"
        super().__init__(message + "; run the same command again to resume")
        self.step = step


def _exit_preempted(signum: int, frame) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED)


class StopRequest:
    """Installs the handlers for its lifetime (`with StopRequest() as stop:`) and restores the old ones."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self.checkpointed = False  # set once every rank has written the stop's checkpoint
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in SIGNALS:
            try:
                previous = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                continue
            # The entry point's early catcher stands for the default action once the run is over.
            self._previous[sig] = signal.SIG_DFL if exit_status.is_early_handler(previous) else previous
        if exit_status.early_received:  # arrived while the process was starting: acted on like any other
            self.received = exit_status.early_received[0]
            exit_status.early_received.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # After the checkpoint, a signal that would kill the process anyway (default action) ends it with the
            # resume status instead. Under srun --kill-on-bad-exit the first rank to exit 75 gets the others
            # SIGTERMed while they tear down; they must still say 75, or the batch script would not requeue.
            fast_exit = self.checkpointed and handler == signal.SIG_DFL
            signal.signal(sig, _exit_preempted if fast_exit else handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank if any rank received a signal (a host-side collective when there are several ranks:
        no device sync)."""
        return any_rank(self.received is not None)
