"""Experiment trackers: TensorBoard, Weights & Biases, MLflow. Each gets the numbers of every metrics.jsonl row under
the same names (loss, lr, grad_norm, tokens_per_s, ..., eval_loss, exact_match) at the row's step, and the resolved
config as hyperparameters; the run is named after output_dir. Only rank 0 opens them.

A resumed run continues the same tracker run: the W&B and MLflow run ids are kept in <output_dir>/trackers.json, and
TensorBoard drops what was logged after the step the run resumes at (the steps about to be redone; W&B keeps
the first value of a step, and a resumed run logs the same values again: resume is exact).
"""

import importlib.util
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from automodel.config import ConfigError, LoggingConfig, flatten

# tracker -> (module that must import, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
          "mlflow": ("mlflow", "mlflow")}


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

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


def open_trackers(log_cfg: LoggingConfig, output_dir: Path, config: dict[str, Any], config_toml: str,
                  start_step: int) -> list[Tracker]:
    check_installed(log_cfg.backends)
    name = log_cfg.run_name or Path(output_dir).resolve().name
    ids_file = Path(output_dir) / "trackers.json"
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() and start_step > 0 else {}
    opened: list[Tracker] = []
    for backend in log_cfg.backends:
        if backend == "tensorboard":
            opened.append(TensorBoard(Path(output_dir) / "tensorboard", config, config_toml, start_step))
        elif backend == "wandb":
            opened.append(WandB(log_cfg, output_dir, name, config, ids))
        elif backend == "mlflow":
            opened.append(MLflow(log_cfg, output_dir, name, config, ids))
    if ids:
        tmp = ids_file.with_name(ids_file.name + ".partial")
        tmp.write_text(json.dumps(ids, indent=2) + "\n")
        os.replace(tmp, ids_file)
    return opened


class TensorBoard:
    """Event files in <output_dir>/tensorboard: scalars, the config as hyperparameters (HPARAMS tab) and as text."""

    def __init__(self, directory: Path, config: dict[str, Any], config_toml: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # A resumed run drops what the stopped one logged after its checkpoint (the steps it is about to redo).
        self.writer = SummaryWriter(str(directory), purge_step=start_step + 1 if start_step > 0 else None)
        for summary in hparams(flat_config(config), {"eval_loss": math.nan}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "    " + config_toml.replace("\n", "\n    "), global_step=start_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run (online, or offline under <output_dir>/wandb); resumed runs continue it (same id)."""

    def __init__(self, log_cfg: LoggingConfig, output_dir: Path, name: str, config: dict[str, Any], ids: dict):
        import wandb

        ids.setdefault("wandb_id", secrets.token_hex(4))  # W&B ids: 8 characters [a-z0-9]
        self.run = wandb.init(project=log_cfg.wandb_project, name=name, id=ids["wandb_id"], resume="allow",
                              dir=str(output_dir), config=config, mode=log_cfg.wandb_mode or None,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

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

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
