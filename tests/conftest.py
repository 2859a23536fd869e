"""Test-session set-up: nothing reaches the hub, tokenised-data caches stay in a temporary directory. Shared
helpers live in tests/helpers.py."""

import os
import tempfile
from pathlib import Path

import pytest

# Nothing here may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process (subprocesses inherit it): pytest-xdist runs a worker per core, and more OpenMP threads
# than cores spin against each other (a 500-step run went from 0.5 to 5 s a step). The tiny test models gain
# nothing from intra-op threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tokenised-data caches of this test session stay in a temporary directory (subprocesses inherit it).
os.environ["AUTOMODEL_CACHE"] = tempfile.mkdtemp(prefix="automodel-test-cache-")


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory):
    """configs_toml/quickstart.toml's model as it ships (~100% exact match on reversing strings, ~65 s): a
    distillation teacher, the base of configs_toml/qlora_cpu.toml. Trained once per test session: pytest-xdist
    workers share it through their common temporary directory, the first to ask training it under a lock."""
    import automodel
    from filelock import FileLock

    from tests import helpers

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this session's workers
    out, done = root / "trained_quickstart", root / "trained_quickstart.done"
    with FileLock(str(root / "trained_quickstart.lock")):
        if not done.exists():
            result = automodel.train(helpers.quickstart(out, "schedule.warmup_steps=50", "eval.generate_samples=100",
                                                        "eval.at_start=false", "train.eval_every=0",
                                                        "checkpoint.every=0"))
            assert result.metrics["exact_match"] >= 0.95
            done.write_text(str(result.final_dir))
    return Path(done.read_text())
