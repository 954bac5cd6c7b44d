"""Dropout annealing: p goes from `dropout_start` to `dropout_end` over `dropout_anneal_steps`, linearly or on a
half cosine, then stays at `dropout_end`. A pure function of the step, so a resumed run sees the same p.

torch.compile specialises a graph on every dropout probability it sees (nn.Dropout's p is guarded as a constant,
and even a float argument of F.dropout is), so a compiled run would recompile at every step. Under torch.compile
the schedule is therefore snapped to a few levels (`dropout_anneal_levels`, 5 by default): one recompilation per
level, each level held for the steps where it is the nearest to the continuous schedule.
"""

from __future__ import annotations

import math

from trainer.config import TrainConfig

__all__ = ["COMPILED_LEVELS", "dropout_levels", "dropout_at"]

COMPILED_LEVELS = 5  # distinct p values of an annealed run under torch.compile when dropout_anneal_levels = 0


def dropout_levels(config: TrainConfig) -> int:
    """How many distinct values p takes (0: each step its own), resolving dropout_anneal_levels = 0 (automatic)."""
    if config.dropout_anneal_levels:
        return config.dropout_anneal_levels
    return COMPILED_LEVELS if config.compile else 0


def dropout_at(step: int, config: TrainConfig) -> float:
    """The dropout probability for optimizer step `step` (0-based) of an annealed run (`config.anneals_dropout`)."""
    assert config.dropout_start is not None, "dropout_at needs dropout_start (an annealed run)"
    start, end = config.dropout_start, config.dropout_end
    span = config.dropout_anneal_steps or config.max_steps
    ratio = min(1.0, step / span)  # 0 -> 1
    if config.dropout_anneal == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    p = end + coeff * (start - end)
    levels = dropout_levels(config)
    if levels:
        k = round(coeff * (levels - 1))  # the nearest of `levels` equally spaced values from end (0) to start
        p = end + (start - end) * k / (levels - 1)
    return min(max(p, 0.0), 0.99)  # rounding never leaves the validated range
