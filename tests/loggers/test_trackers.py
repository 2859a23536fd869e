"""Trackers: what TensorBoard, MLflow and W&B (offline) received is read back with their own readers and compared with
metrics.jsonl, also across a resume; a missing package is one line naming the extra."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import automodel
from automodel.config import ConfigError
from automodel.loggers import trackers
from tests import helpers
from tests.helpers import REPO, quickstart, read_rows, wait_for_line

pytestmark = pytest.mark.slow  # trains a whole run, twice


def wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of every offline W&B run file under run_dir/wandb: the .wandb file is a LevelDB-style
    log (7-byte header; 32 KiB blocks of records: crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, config = [], {}
    for file in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, pending = Path(file).read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:
                continue
            if len(chunk) < length:  # the tail a killed writer left
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                which = record.WhichOneof("record_type")
                if which == "history":
                    history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in record.history.item})
                elif which == "run":
                    config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
    return history, config


def test_tensorboard_mlflow_and_wandb_get_the_metrics_rows_and_the_config_and_continue_on_resume(tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train.eval_every=10", "train.log_every=5", "data.validation.limit=32", "checkpoint.every=10",
            'logging.backends=["tensorboard", "wandb", "mlflow"]', 'logging.wandb_mode="offline"',
            'logging.run_name="tracked"']
    automodel.train(quickstart(tmp_path, "train.max_steps=20", *args))
    # Resumed from step 20 for ten more steps: the same tracker runs continue.
    result = automodel.train(quickstart(tmp_path, "train.max_steps=30", *args))
    out = result.output_dir
    rows = read_rows(out / "metrics.jsonl")
    train = {r["step"]: r for r in rows if "loss" in r}
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(train) == [5, 10, 15, 20, 25, 30] and sorted(evals) == [0, 10, 20, 30]

    # TensorBoard: every scalar of every row at its step; the config as hyperparameters and as text.
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key, by_step in (("loss", train), ("lr", train), ("grad_norm", train), ("eval_loss", evals)):
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx({s: r[key] for s, r in by_step.items()}, rel=1e-6), key
    assert "_hparams_/session_start_info" in events.summary_metadata
    hparams = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"optim.lr" in hparams and b"model.config.hidden_size" in hparams
    assert "config/text_summary" in events.Tags()["tensors"]

    # MLflow: one run named after the config, the same history, the flattened config as params.
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("automodel").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.info.run_id == json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    for key, by_step in (("loss", train), ("eval_loss", evals), ("exact_match", evals)):
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got == pytest.approx({s: r[key] for s, r in by_step.items()}, rel=1e-9), key
    assert float(run.data.params["optim.lr"]) == quickstart(tmp_path).optim.lr
    assert run.data.params["data.seq_len"] == str(quickstart(tmp_path).data.seq_len)

    # W&B offline: both segments wrote under the same run id; the histories hold every row, the config is nested.
    history, config = wandb_records(out)
    assert len(glob.glob(str(out / "wandb" / "offline-run-*"))) == 2
    assert {Path(p).name.split("-")[-1] for p in glob.glob(str(out / "wandb" / "offline-run-*"))} == {
        json.loads((out / "trackers.json").read_text())["wandb_id"]}
    logged = {}
    for h in history:
        logged.setdefault(h["_step"], {}).update(h)
    for step, row in train.items():
        assert logged[step]["loss"] == pytest.approx(row["loss"], rel=1e-9)
    for step, row in evals.items():
        assert logged[step]["eval_loss"] == pytest.approx(row["eval_loss"], rel=1e-9)
    assert config["optim"]["lr"] == quickstart(tmp_path).optim.lr and config["output_dir"] == str(out)

    # The loss picture was drawn.
    assert (out / "plots" / "loss.png").stat().st_size > 10_000


def own_wandb_service() -> dict:
    """The environment for a run with a W&B service of its own: not the one this test process may have started (its
    address is inherited through WANDB_SERVICE, and a kill -9 of the run would leave the run id held there)."""
    return {k: v for k, v in helpers.env().items() if k != "WANDB_SERVICE"}


def killed_at(out: Path, pattern: str, *overrides: str) -> str:
    """Runs the quickstart in its own process group and kills the group (kill -9: the process, its W&B service, as a
    node failure would) when a line of its output matches `pattern`; returns the output."""
    proc = subprocess.Popen([sys.executable, "launch/run.py", "--config", "configs_toml/quickstart.toml",
                             f"output_dir={out}", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=own_wandb_service(), start_new_session=True)
    try:
        seen = wait_for_line(proc, pattern, timeout=300)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return seen
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_after_kills_at_any_moment_each_tracker_holds_every_metrics_row_once_in_one_run(tmp_path):
    """Kill -9 at step 1 (before the first checkpoint), mid-run as a checkpoint is written (the rows after the step-4
    checkpoint are already in the trackers) and during the export, a resume after each: TensorBoard, MLflow and W&B
    (offline) each hold exactly metrics.jsonl's numbers, once each, in one run, read back with their own readers."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["train.max_steps=12", "schedule.warmup_steps=2", "train.log_every=1", "train.eval_every=4", "checkpoint.every=4",
            "data.validation.limit=32", "eval.generate_samples=0", 'logging.progress_bar="off"',
            'logging.backends=["tensorboard", "wandb", "mlflow"]', 'logging.wandb_mode="offline"']
    killed_at(out, r"^step 1/12", *args)
    killed_at(out, r"^step 8/12", *args)  # the row is out; the checkpoint of step 8 is being written
    log = killed_at(out, r"^eval @ step 12/12", *args)  # the export comes next
    assert "resumed from" in log
    done = subprocess.run([sys.executable, "launch/run.py", "--config", "configs_toml/quickstart.toml",
                           f"output_dir={out}", *args], cwd=REPO, capture_output=True, text=True,
                          env=own_wandb_service(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8, 12]
    expected = {(k, r["step"]): v for r in rows for k, v in trackers.scalars(r).items()}
    assert ("eval_loss", 12) in expected and ("grad_norm", 7) in expected

    def once(pairs: list[tuple[tuple[str, int], float]], tracker: str) -> dict:
        counted: dict = {}
        for key, value in pairs:
            counted.setdefault(key, []).append(value)
        twice = sorted(k for k, v in counted.items() if len(v) > 1)
        assert not twice, f"{tracker} holds these (metric, step) more than once: {twice[:10]}"
        return {k: v[0] for k, v in counted.items()}

    # TensorBoard: every event file of the directory, through TensorBoard's reader (float32 values).
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    board = once([((tag, e.step), e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)],
                 "TensorBoard")
    assert board == pytest.approx(expected, rel=1e-6)

    # MLflow: one run, finished, holding the same history.
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("automodel").experiment_id])
    assert run.info.status == "FINISHED"
    held = once([((key, m.step), m.value) for key in {k for k, _ in expected}
                 for m in client.get_metric_history(run.info.run_id, key)], "MLflow")
    assert held == pytest.approx(expected, rel=1e-12)

    # W&B: every process wrote a segment of one run id (kept in trackers.json); together they hold each row once.
    run_id = json.loads((out / "trackers.json").read_text())["wandb_id"]
    segments = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(segments) == 4 and {Path(p).name.split("-")[-1] for p in segments} == {run_id}  # 4 processes
    history, _ = wandb_records(out)
    wandb = once([((k, h["_step"]), v) for h in history for k, v in h.items() if not k.startswith("_")], "W&B")
    assert wandb == pytest.approx(expected, rel=1e-12)


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(trackers.EXTRAS, "wandb", ("wandb_not_installed_here", "wandb"))
    with pytest.raises(ConfigError) as e:
        trackers.check_installed(["tensorboard", "wandb"])
    assert str(e.value) == ('logging.backends includes "wandb" but the wandb_not_installed_here package is not '
                            "installed: pip install 'automodel[wandb]'")
