"""Helpers for tests of the trainer and of the packages that drive it: a seconds-long config and a small corpus."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig, load_config

__all__ = ["fast_config", "write_small_corpus"]

_WORDS = "the king shall speak of love and death to thee my lord what news from rome good night sweet prince".split()


def fast_config(**changes: Any) -> TrainConfig:
    """The tiny preset cut down to seconds on a CPU: 12 steps of 4 x 32 tokens, an evaluation every 4 steps."""
    base = load_config("tiny").replace(
        device="cpu", block_size=32, batch_size=4, max_steps=12, warmup=2, eval_interval=4, eval_iters=2,
        log_interval=1, tensorboard=False,
    )  # fmt: skip
    return base.replace(**changes)


def write_small_corpus(path: Path, lines: int = 600, seed: int = 0) -> Path:
    """A deterministic Shakespeare-flavoured text of about 30 KB (enough for block sizes up to a few hundred)."""
    rng = random.Random(seed)
    text = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(lines)]
    path = Path(path)
    path.write_text("\n".join(text) + "\n")
    return path
