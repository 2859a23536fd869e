"""The model card's text: sources named as what they are, durations a person reads."""

from pathlib import Path

from automodel.models.card import duration, model_card
from tests.helpers import quickstart


def test_local_files_show_no_split_and_the_wall_time_reads_as_a_duration(tmp_path):
    cfg = quickstart(tmp_path, "data.validation.split=\"train[:50%]\"", 'data.train.limit=100')
    card = model_card(cfg, "", {"steps": 4, "eval_loss": 1.23456, "wall_s": 125.3167}, [], "", False,
                      Path(cfg.output_dir) / "final")
    assert f"- train: file `{cfg.data.train[0].source}` (format `instruction`, first 100 rows)" in card
    assert f"- validation: file `{cfg.data.validation[0].source}` (format `instruction`, rows `train[:50%]`)" in card
    assert "split `train`" not in card
    assert "| wall time | 2 min 5 s |" in card and "125.3167" not in card
    hub = quickstart(tmp_path, 'data.train.source="rajpurkar/squad"', 'data.train.format="squad"')
    card = model_card(hub, "", {}, [], "", False, Path(hub.output_dir) / "final")
    assert "- train: dataset `rajpurkar/squad` (format `squad`, split `train`)" in card
    assert "datasets:\n- rajpurkar/squad" in card


def test_durations():
    assert [duration(s) for s in (4.4, 65.3, 3599.6, 7384)] == ["4 s", "1 min 5 s", "1 h 0 min", "2 h 3 min"]
