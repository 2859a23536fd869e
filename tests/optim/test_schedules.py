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
