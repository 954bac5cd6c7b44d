"""Speculative decoding keeps the target's output: token for token when greedy, in distribution when sampling."""

from __future__ import annotations

import copy

import pytest
import torch

from model.config import ModelConfig
from model.generate import generate_tokens
from model.sampling import SamplingParams, sample, uniforms
from model.speculative import speculative_generate, token_probabilities
from model.testing import chi2_critical_999, chi2_statistic, single_thread
from model.transformer import GPT

_LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_weights=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def _gpt(seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**kw)).eval()


@pytest.fixture(scope="module")
def target() -> GPT:
    return _gpt(0, vocab_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24, **_LLAMA)


@pytest.fixture(scope="module")
def drafts(target) -> dict[str, GPT]:
    """A smaller random model (GPT-2 flavour, own block size), a noisy copy of the target (accepts some) and the
    target itself (accepts all)."""
    small = _gpt(
        1,
        vocab_size=48,
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        norm="layernorm",
        pos="learned",
        mlp="gelu",
        bias=True,
        tie_weights=True,
    )
    noisy = copy.deepcopy(target)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.004 * torch.randn_like(p))
    return {"small": small, "noisy": noisy, "same": target}


@pytest.mark.parametrize("draft_name", ["small", "noisy", "same"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_target_alone(target, drafts, draft_name, k):
    params = SamplingParams(max_new_tokens=50, temperature=0.0)  # 50 > block_size: both models re-window
    for prompt in ([3], [5, 9, 1, 1, 7], list(range(30))):  # the last is longer than block_size
        want = generate_tokens(target, prompt, params)
        got, stats = speculative_generate(target, drafts[draft_name], prompt, params, k=k)
        assert got == want, (draft_name, k, prompt)
        assert 0 <= stats["accepted"] <= stats["proposed"]
        assert stats["target_forwards"] <= params.max_new_tokens


def test_noisy_draft_exercises_both_accept_and_reject(target, drafts):
    _, stats = speculative_generate(
        target, drafts["noisy"], [1, 2, 3], SamplingParams(max_new_tokens=40, temperature=0.0), k=4
    )
    assert 0.0 < stats["acceptance_rate"] < 1.0
    assert stats["acceptance_rate"] == stats["accepted"] / stats["proposed"]


def test_perfect_draft_needs_one_target_step_per_k_plus_1_tokens(target):
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    got, stats = speculative_generate(target, target, [4, 4, 2], params, k=4)  # 3 + 20 tokens fit block_size 24
    assert stats["acceptance_rate"] == 1.0 and stats["target_forwards"] == 4  # 20 tokens, 5 per round
    assert got == generate_tokens(target, [4, 4, 2], params)


def test_seeded_sampling_is_reproducible(target, drafts):
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3, seed=5)
    a = speculative_generate(target, drafts["noisy"], [7, 8], params, k=3)
    b = speculative_generate(target, drafts["noisy"], [7, 8], params, k=3)
    assert a == b and len(a[0]) == 30


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.5),
    ],
    ids=["temperature", "top_k", "top_p", "all"],
)
def test_token_probabilities_is_what_sample_draws_from(params):
    # sample() draws u ~ U[0, 1) and walks the CDF of the kept tokens in descending order; doing the same walk over
    # token_probabilities with the same u must land on the same token, for every seed.
    torch.manual_seed(3)
    logits = 3 * torch.randn(1, 16)
    context = [1, 2, 2, 9]
    probs = token_probabilities(logits, params, [context])[0]  # (V,)
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    if params.top_k:
        assert int((probs > 0).sum()) <= params.top_k
    order = torch.sort(probs, descending=True, stable=True).indices
    cdf = probs[order].cumsum(0)
    for seed in range(60):
        u = uniforms(torch.tensor([seed]), torch.tensor([len(context)]))
        want = int(order[min(int(torch.searchsorted(cdf, u, right=True)), int((probs > 0).sum()) - 1)])
        seeded = SamplingParams(**{**params.__dict__, "seed": seed})
        assert int(sample(logits, [seeded], [seed], [len(context)], [context])[0]) == want


# Chi-square 0.999 quantiles from standard tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.4), to check the
# Wilson-Hilferty approximation used for other degrees of freedom.
_CHI2_999_TABLE = {7: 24.322, 15: 37.697, 30: 59.703, 60: 99.607}


def test_chi2_critical_value_matches_the_table():
    for df, table in _CHI2_999_TABLE.items():
        assert abs(chi2_critical_999(df) - table) / table < 0.015, df


def _peaked(seed: int, vocab: int) -> GPT:
    model = _gpt(seed, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=16, **_LLAMA)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # random init is near uniform: sharpen it, so p and q differ clearly
    return model


def test_sampling_matches_target_distribution_chi_square():
    """Seeded runs of (t1, t2, t3) with k=2: t1 and t2 come from draft acceptances, residual draws and bonus tokens.
    The joint of (t1, t2) and the marginal of t3 must fit the target's exact probabilities (chi-square at 0.1%),
    while the draft's own distribution is far from them (so the test could fail)."""
    vocab, n_samples, prompt = 8, 1500, [1, 5, 2]
    target, draft = _peaked(10, vocab), _peaked(11, vocab)
    params = SamplingParams(max_new_tokens=3, temperature=1.0)
    counts12 = torch.zeros(vocab, vocab)
    counts3 = torch.zeros(vocab)
    rejected = 0
    for seed in range(n_samples):
        tokens, stats = speculative_generate(
            target, draft, prompt, SamplingParams(**{**params.__dict__, "seed": seed}), k=2
        )
        counts12[tokens[0], tokens[1]] += 1
        counts3[tokens[2]] += 1
        rejected += stats["proposed"] - stats["accepted"]
    assert rejected > n_samples // 4  # the residual path ran often

    def exact(model: GPT) -> tuple[torch.Tensor, torch.Tensor]:
        """P(t1, t2) (V, V) and P(t3) (V,) by enumerating the prefixes (plain forward, no cache)."""
        with torch.no_grad():
            p1 = torch.softmax(model(torch.tensor([prompt]))[0][0, -1], -1)  # (V,)
            seq2 = torch.tensor([prompt + [a] for a in range(vocab)])  # (V, P+1)
            p2 = torch.softmax(model(seq2)[0][:, -1], -1)  # (V, V): P(t2 | t1)
            seq3 = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])  # (V*V, P+2)
            p3 = torch.softmax(model(seq3)[0][:, -1], -1)  # (V*V, V): P(t3 | t1, t2)
        joint = p1[:, None] * p2
        return joint, joint.reshape(-1) @ p3

    p12, p3 = exact(target)
    q12, _ = exact(draft)
    for counts, probs, min_df in ((counts12, p12, 40), (counts3, p3, 7)):
        stat, df = chi2_statistic(counts, probs)
        assert df >= min_df  # most cells expect >= 5 samples: a real test, not one pooled cell
        assert stat < chi2_critical_999(df), (stat, df)
    # Power: samples from the draft alone would give a statistic of about n * sum((q - p)^2 / p) + df.
    assert n_samples * float(((q12 - p12) ** 2 / p12).sum()) > 10 * chi2_critical_999(vocab * vocab - 1)


def test_bad_arguments(target, drafts):
    params = SamplingParams(max_new_tokens=2)
    other_vocab = _gpt(2, vocab_size=40, n_layer=1, n_head=2, n_embd=16, block_size=16, **_LLAMA)
    with pytest.raises(ValueError, match="draft vocab_size must equal the target's"):
        speculative_generate(target, other_vocab, [1], params)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 32\]"):
        speculative_generate(target, drafts["small"], [1], params, k=0)
    with pytest.raises(ValueError, match="prompt must hold"):
        speculative_generate(target, drafts["small"], [], params)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 48\)"):
        speculative_generate(target, drafts["small"], [48], params)
