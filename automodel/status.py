"""Exit statuses shared by the per-rank entry point, the preemption handler and the generated batch scripts."""

EXIT_CONFIG_ERROR = 2  # a config problem: one line on stderr, nothing to retry
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": a checkpoint was written; a batch script requeues on it
