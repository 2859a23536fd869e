"""Exit statuses shared by the per-rank entry point, the preemption handler and the generated batch scripts; and the
signals an entry point catches before anything heavy is imported."""

import signal

EXIT_CONFIG_ERROR = 2  # a config problem: one line on stderr, nothing to retry
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": a checkpoint was written; a batch script requeues on it

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # a cluster's time limit (Slurm's --signal), preemption
early_received: list[str] = []  # what arrived before the run installed its own handlers


def _remember(signum: int, frame) -> None:
    early_received.append(signal.Signals(signum).name)


def catch_signals_early() -> None:
    """The first thing a training entry point does: SIGUSR1/SIGTERM are remembered, not fatal, while torch and the
    run's set-up load (seconds); the run's StopRequest takes them over and acts on what was received."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, _remember)
        except ValueError:  # not the main thread
            pass


def is_early_handler(handler: object) -> bool:
    return handler is _remember
