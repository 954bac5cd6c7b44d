import math
import re

import pytest

from trainer.config import TrainConfig
from trainer.lr_schedule import learning_rate


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1 / 11)
    assert learning_rate(9, cfg) == pytest.approx(10 / 11)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    assert learning_rate(500, cfg) == pytest.approx(0.1)
    lrs = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_and_constant():
    lin = TrainConfig(lr=1.0, min_lr=0.0, warmup=0, max_steps=100, decay="linear")
    assert learning_rate(50, lin) == pytest.approx(0.5)
    const = TrainConfig(lr=0.5, min_lr=0.0, warmup=0, max_steps=100, decay="constant")
    assert learning_rate(99, const) == 0.5


def test_trapezoid_is_flat_then_falls_linearly_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup=10, max_steps=110, decay="trapezoid", warmdown_steps=40)
    assert learning_rate(9, cfg) == pytest.approx(10 / 11)
    assert [learning_rate(s, cfg) for s in (10, 40, 70)] == [1.0, 1.0, 1.0]  # constant until the warmdown
    assert learning_rate(90, cfg) == pytest.approx(0.5)  # 20 of 40 warmdown steps left
    assert learning_rate(109, cfg) == pytest.approx(1 / 40)
    assert learning_rate(110, cfg) == 0.0
    lrs = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(decay="trapezoid"), "warmdown_steps must be an integer in [1, 100]"),
        (dict(decay="trapezoid", warmdown_steps=101), "warmdown_steps must be an integer in [1, 100]"),
        (dict(decay="cosine", warmdown_steps=10), "warmdown_steps applies to decay=trapezoid only"),
        # a warmup as long as the run leaves no room at all: the error names the warmup, not an empty range
        (dict(decay="trapezoid", warmup=110, warmdown_steps=5), "warmup must be below decay_steps or max_steps (110)"),
    ],
)
def test_trapezoid_needs_a_warmdown_that_fits(changes, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        TrainConfig(lr=1.0, **{"warmup": 10, "max_steps": 110, **changes})
