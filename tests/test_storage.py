"""A write the filesystem refuses is one line naming the place, the setting that chose it and what to do: a full
output_dir during a checkpoint (the last good one kept, the half-written one removed, the run resumable), a
read-only tokenisation cache or Hugging Face cache. Real filesystems: small tmpfs mounts (root only; skipped
elsewhere)."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from automodel import storage
from automodel.data.tokenize import cache_root
from automodel.config import DataConfig
from tests import helpers
from tests.helpers import REPO


@pytest.fixture
def mount(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs of `size` under tmp_path, unmounted afterwards."""
    mounted = []

    def make(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root with CAP_SYS_ADMIN: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def run(out, *overrides, env=None):
    return subprocess.run([sys.executable, "launch/run.py", "--config", "configs_toml/quickstart.toml",
                           f"output_dir={out}", 'logging.progress_bar="off"', "schedule.warmup_steps=0",
                           "eval.generate_samples=0", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**helpers.env(), **(env or {})})


def test_an_empty_automodel_cache_is_unset_never_the_working_directory(monkeypatch):
    monkeypatch.setenv("AUTOMODEL_CACHE", "")
    assert storage.automodel_cache() == Path.home() / ".cache" / "automodel"
    assert cache_root(DataConfig()) == Path.home() / ".cache" / "automodel" / "tokenized"
    monkeypatch.setenv("AUTOMODEL_CACHE", "/somewhere")
    assert cache_root(DataConfig()) == Path("/somewhere/tokenized")


def test_errors_are_named_by_their_os_cause_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMODEL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    line = storage.explain(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "cache" / "x")), out)
    assert line == (f"no permission to write to {tmp_path / 'cache' / 'x'} (the tokenisation cache, data.cache_dir "
                    "or $AUTOMODEL_CACHE): set data.cache_dir or $AUTOMODEL_CACHE to another directory, one this "
                    "process can write")
    # safetensors' errors come from Rust and quote the OS error
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage.errno_of(rust) == errno.ENOSPC
    assert storage.explain(ValueError("a bad value"), out) is None
    assert storage.explain(FileNotFoundError(errno.ENOENT, "No such file", "x"), out) is None


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_last_good_checkpoint_resumes(tmp_path, mount):
    disk = mount("16m")  # room for one checkpoint of the quickstart model (11 MiB), not two
    out = disk / "run"
    full = run(out, "train.max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=2")
    assert full.returncode == 1, full.stderr[-3000:]
    [line] = full.stderr.strip().splitlines()
    assert line.startswith(f"error: no space left on {out} (the run's directory, output_dir), ")
    assert "free space there and run again (the run resumes from its last good checkpoint)" in line
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_000001"]  # the half-written step 2 is gone: its space is back
    # Space found (the run moved to a bigger disk): it resumes from the last good checkpoint and finishes.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, symlinks=True)
    done = run(moved, "train.max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 1" in done.stdout and json.loads((moved / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["AUTOMODEL_CACHE", "HF_HOME"])
def test_a_read_only_cache_is_one_line_naming_the_variable(tmp_path, mount, variable):
    read_only = mount("1m", read_only=True)
    env = {"AUTOMODEL_CACHE": str(tmp_path / "fresh-cache"), variable: str(read_only / "cache")}
    proc = run(tmp_path / "run", "train.max_steps=1", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    knob = "data.cache_dir or $AUTOMODEL_CACHE" if variable == "AUTOMODEL_CACHE" else "$HF_HOME"
    assert line.startswith(f"error: read-only filesystem at {read_only / 'cache'}") and f"set {knob} to another" in line
