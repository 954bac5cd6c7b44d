"""GPU: the shakespeare-char-muon recipe (Muon + AdamW, QK-norm, ReLU², untied head) trains alike in the eager loop,
under torch.compile with CUDA graphs (the preset's mode), and with the whole step captured (step_graph, where Muon
reads its learning rate from a device tensor). 120 steps of nanoGPT's batch; bf16 noise between runs is ~2e-3."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (trains shakespeare-char)")

STEPS, EVAL_EVERY = 120, 40
TOLERANCE = 0.02  # eval-loss difference allowed at every evaluation


def _evals(tmp_path: Path, tag: str, **changes) -> list[float]:
    corpus = os.environ.get("TINYLM_CORPUS")
    if not corpus:
        pytest.skip("TINYLM_CORPUS is not set (the Tiny Shakespeare text is needed)")
    config = load_config("shakespeare-char-muon").replace(
        max_steps=STEPS, warmup=20, warmdown_steps=60, eval_interval=EVAL_EVERY, eval_iters=20, log_interval=10,
        tensorboard=False, dropout=0.0, **changes,  # no dropout: compiled and eager would draw different masks
    )  # fmt: skip
    got: list[float] = []
    result = train(config, Path(corpus), store_root=tmp_path / "store", run_dir=tmp_path / tag,
                   data_dir=tmp_path / "data", progress_callback=lambda s, m: "val_loss" in m and got.append(m["val_loss"]))  # fmt: skip
    assert len(result.losses) == STEPS and all(math.isfinite(x) for x in result.losses)
    return got


def test_muon_trains_alike_eager_compiled_and_captured(tmp_path):
    eager = _evals(tmp_path, "eager", compile_mode="none")
    assert eager[-1] < 2.6, eager  # it learns: well below the unigram entropy (~3.3) and ln(65) = 4.17
    for tag, changes in (("compiled", {}), ("graph", dict(compile_mode="none", step_graph=True))):
        got = _evals(tmp_path, tag, **changes)
        diffs = [abs(a - b) for a, b in zip(got, eager)]
        assert len(got) == len(eager) and max(diffs) < TOLERANCE, (tag, got, eager)
