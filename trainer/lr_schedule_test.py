import math

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
