"""The learning-rate schedule: linear warmup, then cosine (or linear, or no) decay to min_lr, as nanoGPT's get_lr; or
the trapezoid of modded-nanogpt: warmup, constant, then a linear warmdown to min_lr over the last warmdown_steps."""

from __future__ import annotations

import math

from trainer.config import TrainConfig

__all__ = ["learning_rate"]


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based); a pure function of the step, so resume is exact."""
    lr, min_lr, warmup, decay_steps = config.lr, config.min_lr, config.warmup, config.lr_decay_steps
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if config.decay == "constant":
        return lr
    if step >= decay_steps:
        return min_lr
    if config.decay == "trapezoid":
        left = decay_steps - step  # in [1, decay_steps - warmup]
        return min_lr + min(1.0, left / config.warmdown_steps) * (lr - min_lr)
    ratio = (step - warmup) / max(1, decay_steps - warmup)  # in [0, 1)
    if config.decay == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)
