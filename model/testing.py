"""Helpers for tests of samplers: Pearson's chi-square with small cells pooled and its 0.1% critical value (the
engine's and the reference's speculative decoding are checked against exact probabilities), and `single_thread`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

__all__ = ["chi2_critical_999", "chi2_statistic", "single_thread"]

_Z_999 = 3.0902  # standard normal 0.999 quantile


def chi2_critical_999(df: int) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty: df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + _Z_999 * math.sqrt(h)) ** 3


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` (same shape, flattened), pooling the cells whose expected
    count is below 5 into one (so the chi-square approximation holds). Returns (statistic, degrees of freedom)."""
    n = counts.sum()
    expected, observed = (probs.flatten() * n).double(), counts.flatten().double()
    small = expected < 5
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    if expected[-1] < 5:  # the pooled cell is still small: fold it into the smallest other cell
        smallest = int(expected[:-1].argmin())
        expected[smallest] += expected[-1]
        observed[smallest] += observed[-1]
        expected, observed = expected[:-1], observed[:-1]
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Torch on one CPU thread for the scope: tiny models step fastest so, and do not stall a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
