"""Speculative decoding in the engine: greedy output equals the target alone token for token (through concurrent
batching, ragged draft catch-up and the fall-back to plain steps near the end of the draft's context), seeded
sampling has the target's distribution (chi-square), and a bad draft is refused with the reason."""

from __future__ import annotations

import copy

import pytest
import torch

from inference_svc.engine import Engine
from inference_svc.params import make_request
from inference_svc.runner import TorchRunner
from model.config import ModelConfig
from model.generate import generate_tokens
from model.sampling import SamplingParams
from model.testing import chi2_critical_999, chi2_statistic, single_thread
from model.tokenizers import CharTokenizer
from model.transformer import GPT

PROMPTS = ["to be", "or not to be: that", "t", "whether 'tis nobler in the", "the question. ", "suffer!"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


_LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_weights=False)


def _gpt(seed: int, vocab: int, block_size: int, head_scale: float = 8.0, **kw) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab, block_size=block_size, **{**dict(n_layer=1, n_head=2, n_kv_head=2, n_embd=16), **kw}, **_LLAMA
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # random init is near uniform: sharpen it, so choices are clear
    return model


@pytest.fixture(scope="module")
def pair(tiny) -> tuple[GPT, GPT]:
    """A target over the fixture's tokenizer, and a draft that is a noisy copy of it with a 24-token context (RoPE:
    the weights do not depend on the context length): it agrees with the target often, not always."""
    vocab = tiny.tokenizer.vocab_size
    target = _gpt(3, vocab, 64, n_layer=2, n_head=4, n_embd=32)
    draft = _gpt(3, vocab, 24, n_layer=2, n_head=4, n_embd=32)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return target, draft


def _tokens(handle) -> list[int]:
    tokens = []
    for chunk in handle:
        tokens.extend(chunk.token_ids)
    return tokens


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_the_target_alone(tiny, pair, k):
    """Six concurrent greedy requests on 4 slots, a draft whose 24-token context runs out mid-way (those
    sequences finish on plain steps): every request's tokens equal model.generate's for the target alone."""
    target, draft = pair
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (12, 30, 7, 25, 3, 40)]
    with Engine(
        TorchRunner(target, n_slots=4), tiny.tokenizer, draft=TorchRunner(draft, n_slots=4), speculative_k=k
    ) as engine:
        handles = [
            engine.submit(make_request(p, sp, tokenizer=tiny.tokenizer, context_len=64))
            for p, sp in zip(PROMPTS, params)
        ]
        got = [_tokens(h) for h in handles]
        stats = engine.stats()
    for prompt, sp, tokens in zip(PROMPTS, params, got):
        assert tokens == generate_tokens(target, tiny.tokenizer.encode(prompt), sp), prompt
    assert stats.free_slots == 4 and stats.in_flight == 0
    assert 0.1 < stats.draft_accepted / stats.draft_proposed < 0.95  # both verdicts ran


def test_a_perfect_draft_is_always_accepted(tiny, pair):
    """The target as its own draft: every greedy draft stands, which holds only if the draft cache is kept exactly
    in step with the context (catch-up after full acceptance, rewinds after rejections)."""
    target, _ = pair
    same = copy.deepcopy(target)
    with Engine(
        TorchRunner(target, n_slots=2), tiny.tokenizer, draft=TorchRunner(same, n_slots=2), speculative_k=3
    ) as engine:
        handles = [
            engine.submit(
                make_request(
                    p, SamplingParams(max_new_tokens=24, temperature=0.0), tokenizer=tiny.tokenizer, context_len=64
                )
            )
            for p in PROMPTS[:3]
        ]
        got = [_tokens(h) for h in handles]
        stats = engine.stats()
    assert all(len(t) == 24 for t in got)
    assert stats.draft_proposed > 0 and stats.draft_accepted == stats.draft_proposed


def test_seeded_sampling_with_penalty_finishes_and_is_reproducible(tiny, pair):
    target, draft = pair
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=8, top_p=0.9, repetition_penalty=1.3, seed=5)
    runs = []
    for _ in range(2):
        with Engine(
            TorchRunner(target, n_slots=2), tiny.tokenizer, draft=TorchRunner(draft, n_slots=2), speculative_k=3
        ) as engine:
            runs.append(_tokens(engine.submit(make_request("to be", params, tokenizer=tiny.tokenizer, context_len=64))))
    assert len(runs[0]) == 20 and runs[0] == runs[1]


def test_sampling_through_the_engine_has_the_target_distribution():
    """1,500 seeded requests of 2 tokens with k=2, 16 at a time: the joint of (t1, t2), made of acceptances,
    residual draws and bonus tokens, fits the target's exact probabilities (chi-square at 0.1%), while the
    draft's own distribution is far from them (so the test could fail)."""
    vocab, n_samples, prompt = 8, 1500, "bfc"
    tokenizer = CharTokenizer.from_corpus("abcdefgh")
    target, draft = _gpt(10, vocab, 16), _gpt(11, vocab, 16)
    counts = torch.zeros(vocab, vocab)
    with Engine(
        TorchRunner(target, n_slots=16),
        tokenizer,
        max_queue=n_samples,
        draft=TorchRunner(draft, n_slots=16),
        speculative_k=2,
    ) as engine:
        handles = [
            engine.submit(
                make_request(
                    prompt,
                    SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed),
                    tokenizer=tokenizer,
                    context_len=16,
                )
            )
            for seed in range(n_samples)
        ]
        for handle in handles:
            t1, t2 = _tokens(handle)
            counts[t1, t2] += 1
        stats = engine.stats()
    assert stats.draft_proposed - stats.draft_accepted > n_samples // 4  # the residual path ran often

    ids = tokenizer.encode(prompt)

    def joint(model: GPT) -> torch.Tensor:
        with torch.no_grad():
            p1 = torch.softmax(model(torch.tensor([ids]))[0][0, -1], -1)  # (V,)
            p2 = torch.softmax(model(torch.tensor([ids + [a] for a in range(vocab)]))[0][:, -1], -1)  # (V, V)
        return p1[:, None] * p2

    p12, q12 = joint(target), joint(draft)
    stat, df = chi2_statistic(counts, p12)
    assert df >= 40 and stat < chi2_critical_999(df), (stat, df)
    assert n_samples * float(((q12 - p12) ** 2 / p12).sum()) > 10 * chi2_critical_999(vocab * vocab - 1)


def test_a_draft_that_cannot_serve_is_refused(tiny, pair):
    target = TorchRunner(pair[0], n_slots=4)
    draft = TorchRunner(pair[1], n_slots=4)
    with pytest.raises(ValueError, match=r"speculative k must be an integer in \[1, 32\]"):
        Engine(target, tiny.tokenizer, draft=draft, speculative_k=0)
    with pytest.raises(ValueError, match="the draft runner has 2 slots; the engine needs 4"):
        Engine(target, tiny.tokenizer, draft=TorchRunner(pair[1], n_slots=2))
    other_vocab = TorchRunner(_gpt(0, tiny.tokenizer.vocab_size + 3, 24), n_slots=4)
    with pytest.raises(ValueError, match="must share a tokenizer"):
        Engine(target, tiny.tokenizer, draft=other_vocab)
