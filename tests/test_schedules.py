"""LR schedules return multipliers of the peak rate, never absolute rates."""
import pytest

from skillstream.config import TrainConfig
from skillstream.curriculum.schedules import lr_factor


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd", "linear"])
def test_factors_stay_in_0_1_and_warm_up(schedule):
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert all(0 < f <= 1 for f in factors)
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)


def test_cosine_ends_at_the_floor_and_wsd_holds_then_decays():
    cos = TrainConfig(steps=100, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(100, cos) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(79, wsd) == 1.0 and lr_factor(90, wsd) == pytest.approx(0.5) and lr_factor(100, wsd) == 0.0
