import math

import pytest

from automodel.config import ScheduleConfig
from automodel.optim import lr_at

BASE = 1e-3


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "wsd"])
def test_warmup_rises_linearly_to_base(kind):
    sched = ScheduleConfig(kind=kind, warmup_steps=4, min_lr=1e-5)
    assert [lr_at(s, sched, BASE, 100) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_values_at_known_steps():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr=1e-4)
    assert lr_at(10, cos, BASE, 110) == pytest.approx(BASE)
    assert lr_at(60, cos, BASE, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(109, cos, BASE, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    lin = ScheduleConfig(kind="linear", warmup_steps=0, min_lr=0.0)
    assert [lr_at(s, lin, BASE, 4) for s in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    const = ScheduleConfig(kind="constant", warmup_steps=2)
    assert lr_at(2, const, BASE, 10) == lr_at(9, const, BASE, 10) == BASE


def test_wsd_holds_then_decays_over_the_last_fraction():
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, min_lr=0.0, decay_fraction=0.2)
    lrs = [lr_at(s, wsd, BASE, 100) for s in range(100)]
    assert all(lr == BASE for lr in lrs[10:80])
    assert lrs[80] == BASE and lrs[90] == pytest.approx(BASE / 2) and lrs[99] == pytest.approx(BASE / 20)
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "wsd"])
def test_warmup_ratio_is_warmup_steps_of_the_runs_length_rounded_up(kind):
    ratio = ScheduleConfig(kind=kind, warmup_ratio=0.05, min_lr=1e-5)
    for max_steps, steps in ((100, 5), (110, 6), (2, 1)):
        fixed = ScheduleConfig(kind=kind, warmup_steps=steps, min_lr=1e-5)
        assert [lr_at(s, ratio, BASE, max_steps) for s in range(max_steps)] == \
            [lr_at(s, fixed, BASE, max_steps) for s in range(max_steps)]


def test_a_warmup_longer_than_a_smoke_test_names_both_ways_out(tmp_path):
    from automodel.config import ConfigError
    from tests.helpers import quickstart

    with pytest.raises(ConfigError, match=r"schedule.warmup_steps \(50\) is larger than train.max_steps \(2\); lower "
                                          r"it, or .* schedule.warmup_ratio = 0.1 with schedule.warmup_steps = 0"):
        quickstart(tmp_path, "schedule.warmup_steps=50", "train.max_steps=2")
    cfg = quickstart(tmp_path, "schedule.warmup_steps=0", "schedule.warmup_ratio=0.1", "train.max_steps=2")
    assert cfg.schedule.warmup_ratio == 0.1
    with pytest.raises(ConfigError, match="both set the warmup; keep one"):
        quickstart(tmp_path, "schedule.warmup_steps=5", "schedule.warmup_ratio=0.1")
    # Several problems are reported at once, a line each.
    with pytest.raises(ConfigError) as error:
        quickstart(tmp_path, "schedule.warmup_steps=0", "schedule.warmup_ratio=1.5", "optim.lr=-1",
                   "train.log_every=0")
    lines = str(error.value).splitlines()
    for key in ("schedule.warmup_ratio must be in", "optim.lr must be", "train.log_every must be"):
        assert sum(key in line for line in lines) == 1, key
