"""Experiment trackers: TensorBoard, Weights & Biases, MLflow. Each gets the numbers of every metrics.jsonl row under
the same names (loss, lr, grad_norm, tokens_per_s, ..., eval_loss, exact_match) at the row's step, and the resolved
config as hyperparameters; the run is named after output_dir. Only rank 0 opens them.

A run that continues (a resume, or a restart with the same config before the first checkpoint) continues the same
tracker runs: the W&B and MLflow run ids are kept in <output_dir>/trackers.json. Each tracker then ends up holding
metrics.jsonl's rows exactly once, whatever was killed when:
- metrics.jsonl is the record. A row goes to the file first, then to the trackers, and a step's first record is
  the one kept: a resumed run does not log again the rows of steps it redoes (resume is exact: the same losses).
- On opening, each tracker is read back (TensorBoard's event files, MLflow's metric history, W&B's offline run files
  or, online, the step its server reports) and given the rows it lacks: a kill between the file and the tracker, or
  the rows a killed W&B process still held in its buffer.
"""

import importlib.util
import json
import math
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from automodel.config import ConfigError, LoggingConfig, flatten

# tracker -> (module that must import, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
          "mlflow": ("mlflow", "mlflow")}


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def held(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        """The (metric, step) pairs of `rows` the tracker already holds, as read back from it."""

    def close(self) -> None: ...


def check_installed(backends: list[str]) -> None:
    """One line per tracker whose package is missing, naming the extra that installs it."""
    missing = [f"logging.backends includes \"{b}\" but the {EXTRAS[b][0]} package is not installed: "
               f"pip install 'automodel[{EXTRAS[b][1]}]'" for b in backends
               if importlib.util.find_spec(EXTRAS[b][0]) is None]
    if missing:
        raise ConfigError("\n".join(missing))


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, `step` aside."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """{"optim.lr": 3e-4, ...}: scalars as they are, lists and empty tables as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flatten(config).items()}


def catch_up(tracker: Tracker, rows: list[dict[str, Any]]) -> int:
    """Logs to the tracker the numbers of `rows` it does not hold, in order; returns how many rows it was given."""
    held = tracker.held(rows)
    given = 0
    for row in rows:
        missing = {k: v for k, v in scalars(row).items() if (k, row["step"]) not in held}
        if missing:
            tracker.log(missing, row["step"])
            given += 1
    return given


def open_trackers(log_cfg: LoggingConfig, output_dir: Path, config: dict[str, Any], config_toml: str,
                  continues: bool, start_step: int) -> list[Tracker]:
    """The trackers of `logging.backends`; with `continues`, the tracker runs this output_dir already has (else new
    ones, an earlier TensorBoard directory set aside as tensorboard-before-<time>)."""
    check_installed(log_cfg.backends)
    name = log_cfg.run_name or Path(output_dir).resolve().name
    ids_file = Path(output_dir) / "trackers.json"
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() and continues else {}
    board = Path(output_dir) / "tensorboard"
    if "tensorboard" in log_cfg.backends and not continues and board.is_dir() and any(board.iterdir()):
        os.replace(board, board.with_name(f"tensorboard-before-{time.strftime('%Y%m%d-%H%M%S')}"))
    opened: list[Tracker] = []
    for backend in log_cfg.backends:
        if backend == "tensorboard":
            opened.append(TensorBoard(board, config, config_toml, start_step))
        elif backend == "wandb":
            opened.append(WandB(log_cfg, output_dir, name, config, ids))
        elif backend == "mlflow":
            opened.append(MLflow(log_cfg, output_dir, name, config, ids))
    if ids:  # written before a row is logged: a kill from here on continues these runs
        tmp = ids_file.with_name(ids_file.name + ".partial")
        tmp.write_text(json.dumps(ids, indent=2) + "\n")
        os.replace(tmp, ids_file)
    return opened


class TensorBoard:
    """Event files in <output_dir>/tensorboard: scalars, the config as hyperparameters (HPARAMS tab) and as text."""

    def __init__(self, directory: Path, config: dict[str, Any], config_toml: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.directory = directory
        fresh = not directory.is_dir() or not any(directory.iterdir())
        self.writer = SummaryWriter(str(directory))
        if fresh:  # once per run
            for summary in hparams(flat_config(config), {"eval_loss": math.nan}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "    " + config_toml.replace("\n", "\n    "), global_step=start_step)
            self.writer.flush()

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # on disk at once: a killed process loses nothing it logged

    def held(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        # Every event file of the directory, earlier processes' too (a torn last record is skipped by the reader).
        events = EventAccumulator(str(self.directory), size_guidance={"scalars": 0})
        events.Reload()
        return {(tag, e.step) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run (online, or offline under <output_dir>/wandb); resumed runs continue it (same id)."""

    def __init__(self, log_cfg: LoggingConfig, output_dir: Path, name: str, config: dict[str, Any], ids: dict):
        import wandb

        ids.setdefault("wandb_id", secrets.token_hex(4))  # W&B ids: 8 characters [a-z0-9]
        self.id, self.directory = ids["wandb_id"], Path(output_dir) / "wandb"
        self.run = wandb.init(project=log_cfg.wandb_project, name=name, id=ids["wandb_id"], resume="allow",
                              dir=str(output_dir), config=config, mode=log_cfg.wandb_mode or None,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def held(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        if not self.run.offline:
            # Online, W&B's server says where the run's history ends (the step a resumed run starts at) and ignores
            # any row before it; what a killed process had not yet sent comes after it.
            first = self.run.starting_step
            return {(k, r["step"]) for r in rows if r["step"] < first for k in scalars(r)}
        return {(key, step) for history in wandb_offline_history(self.directory, self.id)
                for step in [history.get("_step")] if isinstance(step, int)
                for key in history if not key.startswith("_")}

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in `logging.mlflow_experiment`, in a SQLite store in output_dir unless a URI is given."""

    def __init__(self, log_cfg: LoggingConfig, output_dir: Path, name: str, config: dict[str, Any], ids: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = (log_cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}")
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(log_cfg.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(log_cfg.mlflow_experiment))
        run_id: Optional[str] = ids.get("mlflow_run_id")
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(run_id, params=params[i:i + 100])
        ids["mlflow_run_id"] = self.run_id = run_id

    def held(self, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        keys = {k for r in rows for k in scalars(r)}
        return {(key, m.step) for key in keys for m in self.client.get_metric_history(self.run_id, key)}

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def wandb_offline_history(directory: Path, run_id: str) -> list[dict[str, Any]]:
    """The history rows ({"_step": 20, "loss": 2.31, ...}) of every offline W&B segment of run `run_id` under
    `directory` (<output_dir>/wandb), oldest first, up to a torn tail. A .wandb file is a LevelDB-style log: a 7-byte
    header, then 32 KiB blocks of records (crc32, length, type FULL/FIRST/MIDDLE/LAST), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    rows: list[dict[str, Any]] = []
    for file in sorted(Path(directory).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        data, pos, pending = file.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0 or len(chunk) < length:  # padding, or the tail a killed writer left
                continue
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind not in (1, 4):
                continue
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError: a torn record ends what is readable
                break
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
