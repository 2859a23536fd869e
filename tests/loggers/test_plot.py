"""Loss pictures: the run's plots/loss.png and `automodel plot` over runs and sweeps."""

import json

import numpy as np
import pytest
from PIL import Image

from automodel.cli import main
from automodel.config import ConfigError
from automodel.loggers import RunLogger
from automodel.loggers.plot import runs_of
from tests.helpers import write_jsonl


def fake_run(path, scale: float):
    rows = [{"step": s, "loss": scale * 4 / s, "lr": 1e-3 * (1 - s / 60), "grad_norm": 1.0, "tokens_per_s": 1.0,
             "ms_per_step": 1.0, "padding": 0.0} for s in range(5, 61, 5)]
    rows += [{"step": s, "eval_loss": scale * 5 / (s + 5), "eval_tokens": 10} for s in (0, 20, 40, 60)]
    path.mkdir(parents=True)
    write_jsonl(path / "metrics.jsonl", rows)
    return path


def drawn(png) -> np.ndarray:
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 500
    return image


def test_the_run_logger_redraws_the_picture_at_each_evaluation_and_at_the_end(tmp_path):
    logger = RunLogger(tmp_path, 60, "off", plot=True)
    png = tmp_path / "plots" / "loss.png"
    logger.row({"step": 5, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "ms_per_step": 1.0,
                "padding": 0.0})
    assert not png.exists()  # train rows alone do not redraw
    logger.row({"step": 5, "eval_loss": 3.2, "eval_tokens": 10})
    first = drawn(png)
    logger.row({"step": 10, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "ms_per_step": 1.0,
                "padding": 0.0})
    logger.close()
    last = drawn(png)
    assert first.shape == last.shape and not np.array_equal(first, last)  # the new train row is in the last one
    # Coloured curves: the train loss (C0 blue, #1f77b4) is drawn.
    assert (np.abs(last.astype(int) - [31, 119, 180]).sum(axis=2) < 40).sum() > 100


def test_automodel_plot_overlays_runs_and_labels_sweep_tasks_by_their_overrides(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 1.0), fake_run(tmp_path / "b", 0.5)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"config": "x.toml", "script": None, "tasks": [
        {"index": 0, "overrides": ["optim.lr=1e-4"], "run_dir": str(a)},
        {"index": 1, "overrides": ["optim.lr=3e-4"], "run_dir": str(b)}]}))
    assert [label for label, _ in runs_of([sweep])] == ["optim.lr=1e-4", "optim.lr=3e-4"]
    assert main(["plot", str(sweep), "--out", str(tmp_path / "sweep.png")]) == 0
    assert "plotted 2 run(s)" in capsys.readouterr().out
    # Two runs: two colours of curves (C0 blue, C1 orange #ff7f0e).
    image = drawn(tmp_path / "sweep.png").astype(int)
    for colour in ([31, 119, 180], [255, 127, 14]):
        assert (np.abs(image - colour).sum(axis=2) < 40).sum() > 100
    # One run: written into the run directory by default.
    assert main(["plot", str(a)]) == 0 and drawn(a / "plots" / "loss.png") is not None
    with pytest.raises(ConfigError, match="neither a run directory"):
        runs_of([tmp_path])
