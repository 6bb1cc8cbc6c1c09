"""Learning-rate schedules at their landmarks."""
import math

import pytest

from pretrain.optim import lr_multiplier


def m(step, schedule, total=100, warmup=10, min_ratio=0.1, decay_fraction=0.2):
    return lr_multiplier(step, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio,
                         decay_fraction=decay_fraction)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear(schedule):
    assert m(1, schedule) == pytest.approx(0.1)
    assert m(5, schedule) == pytest.approx(0.5)
    assert m(10, schedule) == pytest.approx(1.0)


def test_cosine():
    assert m(55, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through decay
    assert m(100, "cosine") == pytest.approx(0.1)
    assert m(32.5, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_linear():
    assert m(55, "linear") == pytest.approx(1 - 0.9 * 0.5)
    assert m(100, "linear") == pytest.approx(0.1)


def test_wsd_stays_flat_then_decays():
    assert m(11, "wsd") == 1.0 and m(80, "wsd") == 1.0
    assert m(90, "wsd") == pytest.approx(1 - 0.9 * 0.5)
    assert m(100, "wsd") == pytest.approx(0.1)


def test_constant():
    assert m(11, "constant") == m(100, "constant") == 1.0
