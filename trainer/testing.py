"""Helpers for tests of the trainer and of the packages that drive it: a seconds-long config and a small corpus."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig, load_config

__all__ = ["fast_config", "short_run_evals", "write_small_corpus", "SHORT_RUN_STEPS"]

SHORT_RUN_STEPS, SHORT_RUN_EVAL_EVERY = 120, 40

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


def short_run_evals(
    corpus: Path, work: Path, preset: str, tag: str, *, step_losses: list[float] | None = None, **changes: Any
) -> list[float]:
    """The GPU tests' short run: SHORT_RUN_STEPS steps of `preset` (a trapezoid warmdown cut to fit), no dropout
    (compiled and eager runs would draw different masks); the val loss at every SHORT_RUN_EVAL_EVERY steps. Checks
    that every step ran with a finite loss; `step_losses`, if given, receives every step's training loss."""
    from trainer.train import train

    base = load_config(preset)
    if base.decay == "trapezoid":  # its warmdown must fit in the shorter run (validated with max_steps)
        changes.setdefault("warmdown_steps", 60)
    config = base.replace(
        max_steps=SHORT_RUN_STEPS, warmup=20, eval_interval=SHORT_RUN_EVAL_EVERY, eval_iters=20, log_interval=10,
        tensorboard=False, dropout=0.0, **changes,
    )  # fmt: skip
    got: list[float] = []
    result = train(config, Path(corpus), store_root=work / "store", run_dir=work / tag, data_dir=work / "data",
                   progress_callback=lambda s, m: "val_loss" in m and got.append(m["val_loss"]))  # fmt: skip
    assert len(result.losses) == SHORT_RUN_STEPS and all(math.isfinite(x) for x in result.losses)
    if step_losses is not None:
        step_losses.extend(result.losses)
    return got
