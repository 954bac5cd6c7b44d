"""Tests of SamplingParams validation and the batched sampler."""

from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams, sample, uniforms


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer in \[1, 65536\]"),
        ({"temperature": -0.1}, r"temperature must be 0 \(greedy\) or a number in \[0.01, 100.0\]"),
        ({"temperature": float("inf")}, "temperature must be 0 .greedy. or a number"),
        ({"temperature": 1e-40}, r"temperature must be 0 \(greedy\) or a number in \[0.01, 100.0\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be a number in \[0.01, 10.0\]"),
        ({"repetition_penalty": 1e-40}, r"repetition_penalty must be a number in \[0.01, 10.0\]"),
        ({"seed": -1}, "seed must be None or an integer"),
        ({"stop": ["a"] * 9}, "stop must be a list of at most 8 strings"),
        ({"stop": [""]}, "each stop string must have 1 to 256 characters"),
    ],
)
def test_params_validation(kw, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kw)


def test_params_normalised():
    p = SamplingParams(stop=["\n\n", "END"], temperature=1)
    assert p.stop == ("\n\n", "END") and isinstance(p.temperature, float)
    assert SamplingParams(stop="x").stop == ("x",)
    hash(p)  # frozen and hashable


def _logits() -> torch.Tensor:
    return torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def test_greedy_and_top_k_1():
    logits = torch.randn(6, 50)
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(greedy, logits.argmax(-1))
    top1 = sample(logits, [SamplingParams(temperature=5.0, top_k=1)] * 6)
    assert torch.equal(top1, logits.argmax(-1))


def _draws(params: SamplingParams, n: int = 3000, logits: torch.Tensor | None = None) -> torch.Tensor:
    logits = _logits() if logits is None else logits
    return torch.cat([sample(logits, [params], [1234], [i]) for i in range(n)])


def test_distribution_matches_softmax():
    counts = torch.bincount(_draws(SamplingParams()), minlength=5).float() / 3000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]), atol=0.03, rtol=0)


def test_top_k_and_top_p_restrict_support():
    assert set(_draws(SamplingParams(top_k=2), 500).tolist()) == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.5), 200).tolist()) == {0}  # 0.5 mass reached by the first
    assert set(_draws(SamplingParams(top_p=0.7), 500).tolist()) == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.76), 800).tolist()) == {0, 1, 2}


def test_temperature_sharpens():
    cold = (_draws(SamplingParams(temperature=0.3), 1000) == 0).float().mean()
    hot = (_draws(SamplingParams(temperature=3.0), 1000) == 0).float().mean()
    assert cold > 0.85 and hot < 0.4


def test_seeded_rows_independent_of_batch():
    logits = torch.randn(3, 40)
    p = SamplingParams(seed=7)
    alone = sample(logits[1:2], [p], [7], [5])
    batched = sample(logits, [SamplingParams(), p, SamplingParams(temperature=0)], [1, 7, 9], [3, 5, 0])
    assert batched[1] == alone[0]
    assert batched[2] == logits[2].argmax()


def test_same_seed_same_sequence():
    logits = torch.randn(1, 40)

    def run(seed: int) -> list[int]:
        return [int(sample(logits, [SamplingParams(seed=seed)], [seed], [i])[0]) for i in range(20)]

    assert run(7) == run(7)
    assert len(set(run(7))) > 1 and run(7) != run(8)


def test_repetition_penalty():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2]])
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [greedy], prev_tokens=[[0]]) == 1  # 2.0 / 2 = 1.0 < 1.5
    assert sample(logits, [greedy], prev_tokens=[[]]) == 0
    neg = torch.tensor([[-1.0, -1.2, -5.0]])
    assert sample(neg, [greedy], prev_tokens=[[0]]) == 1  # -1.0 * 2 = -2.0 < -1.2
    assert torch.equal(logits, torch.tensor([[2.0, 1.5, -1.0, -1.2]]))  # input untouched


def test_bf16_logits_and_shape():
    logits = torch.randn(4, 30).to(torch.bfloat16)
    out = sample(logits, [SamplingParams(top_k=5, top_p=0.9)] * 4)
    assert out.shape == (4,) and out.dtype == torch.long
    top5 = logits.float().topk(5).indices
    assert all(int(out[b]) in top5[b].tolist() for b in range(4))


def test_sampling_is_total_over_non_finite_logits():
    """Issue 22 finding 1: a row whose distribution is NaN (inf logits from an overflow, or NaN from the model)
    made the sampler index -1 and fail its whole batch; now that row falls back to its argmax."""
    logits = torch.randn(4, 65)
    logits[1] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :] = float("-inf")
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_p=0.9, seed=2)] * 2
    tokens = sample(logits, params, [p.seed for p in params])
    assert tokens.shape == (4,) and all(0 <= t < 65 for t in tokens.tolist())
    assert tokens[2].item() == 7
    alone = sample(logits[:1], params[:1], [1])
    assert tokens[0].item() == alone[0].item()  # the good row is unaffected by the bad ones


def test_uniforms_are_uniform_and_a_function_of_seed_and_counter_alone():
    seeds = torch.tensor([0, 1, 2**40 + 3, 2**63 - 1]).repeat_interleave(5000)
    counters = torch.arange(5000).repeat(4)
    u = uniforms(seeds, counters)
    assert u.dtype == torch.float32 and bool((u >= 0).all() and (u < 1).all())
    for row in u.view(4, 5000):  # each seed's stream: chi-square over 20 bins (df 19: p = 0.001 at 43.8)
        counts = torch.histc(row, bins=20, min=0.0, max=1.0)
        chi2 = float(((counts - 250.0) ** 2 / 250.0).sum())
        assert chi2 < 43.8, chi2
    assert abs(float(torch.corrcoef(u.view(4, 5000))[0, 1])) < 0.05  # neighbouring seeds are not correlated
    again = uniforms(seeds.flip(0), counters.flip(0)).flip(0)  # other neighbours, other order: same draws
    assert torch.equal(u, again)
    assert not torch.equal(uniforms(seeds, counters + 1), u)


def test_unseeded_draws_follow_torch_manual_seed():
    logits = torch.zeros(1, 50)
    torch.manual_seed(3)
    a = [int(sample(logits, [SamplingParams()])[0]) for _ in range(10)]
    torch.manual_seed(3)
    assert a == [int(sample(logits, [SamplingParams()])[0]) for _ in range(10)] and len(set(a)) > 1
