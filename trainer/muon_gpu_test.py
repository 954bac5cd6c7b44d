"""GPU: the shakespeare-char-muon recipe (Muon + AdamW, QK-norm, ReLU², untied head) trains alike in the eager loop,
under torch.compile with CUDA graphs (the preset's mode), and with the whole step captured (step_graph, where Muon
reads its learning rate from a device tensor), the model eager or compiled inside the capture. 120 steps of nanoGPT's batch; bf16 noise between runs is ~2e-3."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer.testing import short_run_evals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (trains shakespeare-char)")

TOLERANCE = 0.02  # eval-loss difference allowed at every evaluation


def _evals(tmp_path: Path, tag: str, **changes) -> list[float]:
    corpus = os.environ.get("TINYLM_CORPUS")
    if not corpus:
        pytest.skip("TINYLM_CORPUS is not set (the Tiny Shakespeare text is needed)")
    return short_run_evals(Path(corpus), tmp_path, "shakespeare-char-muon", tag, **changes)


def test_muon_trains_alike_eager_compiled_and_captured(tmp_path):
    eager = _evals(tmp_path, "eager", compile_mode="none")
    assert eager[-1] < 2.6, eager  # it learns: well below the unigram entropy (~3.3) and ln(65) = 4.17
    captured = dict(step_graph=True)  # the whole step one CUDA graph: the eager model, then the compiled one inside it
    for tag, changes in (("compiled", {}), ("graph", dict(captured, compile_mode="none")),
                         ("compiled-graph", dict(captured, compile_mode="default"))):  # fmt: skip
        got = _evals(tmp_path, tag, **changes)
        diffs = [abs(a - b) for a, b in zip(got, eager)]
        assert len(got) == len(eager) and max(diffs) < TOLERANCE, (tag, got, eager)
