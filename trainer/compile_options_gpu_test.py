"""GPU: the compile options (compile_optimizer, compile_scope=blocks) under the presets' reduce-overhead mode train
like the preset's whole-model compile, and the compiled optimizer step replays as CUDA graphs (no skips).

120 steps of nanoGPT's shakespeare-char batch (and of the muon recipe), no dropout (a whole-model graph and per-block
graphs draw different masks); bf16 noise between such runs is ~2e-3 in eval loss. CPU tests of the same options:
trainer/optimizer_step_test.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer.testing import short_run_evals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (trains shakespeare-char)")

TOLERANCE = 0.02  # eval-loss difference allowed at every evaluation


def _evals(tmp_path: Path, preset: str, tag: str, **changes) -> list[float]:
    corpus = os.environ.get("TINYLM_CORPUS")
    if not corpus:
        pytest.skip("TINYLM_CORPUS is not set (the Tiny Shakespeare text is needed)")
    return short_run_evals(Path(corpus), tmp_path, preset, tag, **changes)


@pytest.mark.parametrize("preset", ["shakespeare-char", "shakespeare-char-muon"])
def test_compiled_step_and_blocks_train_like_the_whole_model_compile(tmp_path, preset):
    ro = dict(compile_mode="reduce-overhead", step_graph=False, kernel_names="")  # the options modify this way
    expected = _evals(tmp_path, preset, "model", **ro)
    torch._dynamo.utils.counters.clear()
    got = _evals(tmp_path, preset, "opt-blocks", compile_optimizer=True, compile_scope="blocks", **ro)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    diffs = [abs(a - b) for a, b in zip(got, expected)]
    assert len(got) == len(expected) and max(diffs) < TOLERANCE, (got, expected)
    assert skips == 0, f"{skips} compiled graphs ran without CUDA graphs (TORCH_LOGS=perf_hints says why)"
