"""Test-session set-up: nothing reaches the hub, tokenised-data caches stay in a temporary directory. Shared
helpers live in tests/helpers.py."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
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
# Removed when this process exits (each pytest-xdist worker makes its own).
os.environ["AUTOMODEL_CACHE"] = tempfile.mkdtemp(prefix="automodel-test-cache-")
atexit.register(shutil.rmtree, os.environ["AUTOMODEL_CACHE"], ignore_errors=True)


# configs_toml/quickstart.toml's model as it ships, trained in a process of its own from the start of the session
# (the collection hook below) so that no test worker sits waiting on it.
from tests.helpers import TRAINED_QUICKSTART  # noqa: E402


def _shared_root(config) -> Path:
    """A directory every pytest-xdist worker of this session shares (their common basetemp), or the basetemp."""
    root = config._tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def _start_training(root: Path) -> None:
    """Starts the quickstart's training once per session (the first worker to ask), detached, with a tokenisation
    cache of its own (a worker's goes when the worker exits)."""
    from filelock import FileLock

    from tests import helpers

    with FileLock(str(root / f"{TRAINED_QUICKSTART}.lock")):
        started = root / f"{TRAINED_QUICKSTART}.started"
        if started.exists():
            return
        started.touch()
        with open(root / f"{TRAINED_QUICKSTART}.log", "w") as log:  # the child keeps its own copy open
            subprocess.Popen([sys.executable, "-c", "import sys; from tests import helpers; "
                              "helpers.train_shared_quickstart(sys.argv[1])", str(root)],
                             cwd=helpers.REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "AUTOMODEL_CACHE": str(root / f"{TRAINED_QUICKSTART}_cache")})


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(session, config, items):
    if any(TRAINED_QUICKSTART in getattr(item, "fixturenames", ()) for item in items):
        _start_training(_shared_root(config))


@pytest.fixture(scope="session")
def trained_quickstart(request):
    """configs_toml/quickstart.toml's model as it ships (~100% exact match on reversing strings, ~65 s): a
    distillation teacher, the base of configs_toml/qlora_cpu.toml. Trained once per test session, by
    tests/helpers.py:train_shared_quickstart in its own process; the workers wait for its directory."""
    root = _shared_root(request.config)
    _start_training(root)  # started at collection; a no-op then
    done, failed = root / f"{TRAINED_QUICKSTART}.done", root / f"{TRAINED_QUICKSTART}.failed"
    deadline = time.time() + 1200
    while not done.exists():
        if failed.exists():
            pytest.fail(f"training the quickstart failed:\n{failed.read_text()[-3000:]}")
        assert time.time() < deadline, f"the quickstart was not trained in 20 min: {root / TRAINED_QUICKSTART}.log"
        time.sleep(0.5)
    return Path(done.read_text())


@pytest.fixture(autouse=True)
def no_cluster_unless_asked(request, monkeypatch):
    """A test that does not ask for the test Slurm cluster (tests/launcher/conftest.py's `slurm`, which sets
    SLURM_CONF for the rest of its worker's session) sees none, nor one this machine may belong to: sinfo answers
    nothing, so `launch --slurm` checks no partition. (Any test: a worker that started the cluster runs others.)"""
    if "slurm" not in request.fixturenames:
        monkeypatch.setenv("SLURM_CONF", "/dev/null")  # (a missing file: sinfo retries for 60 s)
