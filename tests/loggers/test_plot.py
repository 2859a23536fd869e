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


def overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels on one axis whose boxes overlap, as drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
            pairs += [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
                      if box_a.overlaps(box_b)]
    return pairs


def test_a_run_with_several_validation_sets_draws_every_set_exact_match_the_schedule_and_the_kept_step(tmp_path):
    from automodel.config import ScheduleConfig
    from automodel.loggers.plot import draw, lr_curve
    from automodel.optim import lr_at

    max_steps = 500
    rows = [{"step": s, "loss": 5.0 * 0.99 ** s + 0.01, "lr": 0.0, "grad_norm": 1.0, "tokens_per_s": 1.0,
             "ms_per_step": 1.0, "padding": 0.0} for s in range(50, max_steps + 1, 50)]
    for s in range(0, max_steps + 1, 100):
        rows.append({"step": s, "eval_loss": 5.0 * 0.99 ** s + 0.02, "eval_loss/short": 4.0 * 0.99 ** s + 0.01,
                     "eval_loss/long": 6.0 * 0.99 ** s + 0.03, "exact_match": min(1.0, s / 300), "eval_tokens": 1})
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", rows)
    (run / "summary.json").write_text(json.dumps({"best_step": 300}))
    sched = ScheduleConfig(kind="cosine", warmup_steps=50, min_lr=1e-4)
    curve = lr_curve(lambda s: lr_at(s, sched, 3e-3, max_steps), max_steps)
    fig = draw([("run", run)], lr=curve)
    losses, below, match = fig.axes
    assert [t.get_text() for t in losses.get_legend().get_texts()] == [
        "train loss", "eval loss (all sets)", "eval loss (long)", "eval loss (short)", "kept: best step 300"]
    assert [t.get_text() for t in below.get_legend().get_texts()] == ["learning rate", "exact match"]
    steps, lrs = below.lines[0].get_data()
    assert len(steps) == max_steps and lrs[0] == 3e-3 / 50 and max(lrs) == 3e-3  # the warmup shows, step by step
    assert losses.get_yscale() == "log" and not overlapping_labels(fig)
    # The run logger hands the plot its schedule.
    logger = RunLogger(run, max_steps, "off", plot=True, start_step=max_steps, lr=curve)
    logger.close()
    drawn(run / "plots" / "loss.png")


def test_tick_labels_do_not_overlap_on_a_log_axis_of_any_span(tmp_path):
    from automodel.loggers.plot import draw

    for low in (0.9, 0.3, 1e-3):  # within a decade, across one, across several
        run = tmp_path / f"run{low}"
        run.mkdir()
        write_jsonl(run / "metrics.jsonl", [{"step": s, "loss": 3.0 * (low / 3.0) ** (s / 100), "lr": 1e-3}
                                            for s in range(1, 101)])
        fig = draw([("run", run)])
        assert not overlapping_labels(fig), low


def test_runs_overlaid_without_exact_match_get_no_empty_lower_panel(tmp_path):
    from automodel.loggers.plot import draw

    fig = draw([("a", fake_run(tmp_path / "a", 1.0)), ("b", fake_run(tmp_path / "b", 0.5))])
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "step"
    assert len(draw([("a", tmp_path / "a")]).axes) == 3  # one run: its learning rate below (and a twin axis)
