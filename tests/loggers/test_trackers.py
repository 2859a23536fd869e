"""Trackers: what TensorBoard, MLflow and W&B (offline) received is read back with their own readers and compared with
metrics.jsonl, also across a resume; a missing package is one line naming the extra."""

import glob
import json
import struct
from pathlib import Path

import pytest

import automodel
from automodel.config import ConfigError
from automodel.loggers import trackers
from tests.helpers import quickstart, read_rows

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


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(trackers.EXTRAS, "wandb", ("wandb_not_installed_here", "wandb"))
    with pytest.raises(ConfigError) as e:
        trackers.check_installed(["tensorboard", "wandb"])
    assert str(e.value) == ('logging.backends includes "wandb" but the wandb_not_installed_here package is not '
                            "installed: pip install 'automodel[wandb]'")
