"""TorchRunner(small_batch_kernels=...) runs its device-resident decode steps through GPT.forward_cached's fused
small-batch kernels and draws the tokens of the plain runner: greedy and sampled rows, rows joining at different
lengths. On CPU the fused step runs its PyTorch references ("reference": this package's tests do not start Triton's
interpreter; the kernels themselves are tested in kernels/ and model/small_batch_decode_test.py); on a GPU the captured
graphs with the Triton kernels are checked too."""

from __future__ import annotations

import pytest
import torch

from inference_svc.runner import TorchRunner
from model import transformer
from model.sampling import SamplingParams

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=5, seed=1),
    SamplingParams(temperature=0.0, repetition_penalty=1.5),
]
SLOTS, PROMPTS = [3, 0, 5], [[1, 2, 3], [4, 5, 6, 7, 8], [9]]


def run(runner: TorchRunner, steps: int = 8) -> list[list[int]]:
    """Prefill the three prompts, then decode `steps` steps (the last row leaves half way)."""
    tokens = [runner.prefill_sample(SLOTS, PROMPTS, PARAMS, [1, 2, 3]).tolist()]
    for step in range(steps):
        rows = SLOTS if step < steps // 2 else SLOTS[:2]
        kv_len = 1 + step + max(len(p) for p in PROMPTS)
        tokens.append(runner.decode_sample(rows, kv_len, full=True).tolist())
    return tokens


def test_fused_step_draws_the_plain_runners_tokens_on_cpu(tiny, monkeypatch):
    calls = []
    real = transformer.decode_attention_step
    monkeypatch.setattr(transformer, "decode_attention_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = run(TorchRunner(tiny.model, n_slots=6, attention_in_place=True))
    assert calls == []
    fused = run(TorchRunner(tiny.model, n_slots=6, attention_in_place=True, small_batch_kernels="reference"))
    assert len(calls) == 8 * tiny.model.config.n_layer  # every decode step took the fused path
    assert fused == plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton kernels need a GPU")
def test_fused_graphs_draw_the_plain_runners_tokens_on_gpu(tiny):
    plain = run(TorchRunner(tiny.copy(), n_slots=6, device="cuda", cuda_graphs=False, attention_in_place=True))
    eager = run(
        TorchRunner(
            tiny.copy(), n_slots=6, device="cuda", cuda_graphs=False, small_batch_kernels=True, attention_in_place=True
        )
    )
    graphs = run(TorchRunner(tiny.copy(), n_slots=6, device="cuda", small_batch_kernels=True))
    assert graphs == eager  # the captured graphs replay the eager fused step exactly
    assert eager == plain  # the tiny model's logits are spread out: bf16 roundings do not flip its tokens
