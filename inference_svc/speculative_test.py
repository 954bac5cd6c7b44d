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
from inference_svc.testing import SPECULATIVE_PROMPTS, sharp_gpt, target_and_draft
from model.generate import generate_tokens
from model.sampling import SamplingParams
from model.speculative import token_probabilities
from model.testing import chi2_critical_999, chi2_statistic, single_thread
from model.tokenizers import CharTokenizer
from model.transformer import GPT

PROMPTS = SPECULATIVE_PROMPTS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pair(tiny) -> tuple[GPT, GPT]:
    """A target and a draft with a 24-token context."""
    return target_and_draft(tiny.tokenizer.vocab_size, 24)


def _tokens(handle) -> list[int]:
    tokens = []
    for chunk in handle:
        tokens.extend(chunk.token_ids)
    return tokens


@pytest.mark.parametrize("k, resident, decode_steps", [(1, True, 1), (3, True, 3), (1, False, 1), (3, False, 1)])
def test_greedy_equals_the_target_alone(tiny, pair, k, resident, decode_steps):
    """Six concurrent greedy requests on 4 slots, a draft whose 24-token context runs out mid-way (those
    sequences finish on plain steps; on the resident loop, several a launch with decode_steps): every request's
    tokens equal model.generate's for the target alone, with rounds on the device and on the logits path."""
    target, draft = pair
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (12, 30, 7, 25, 3, 40)]
    with Engine(
        TorchRunner(target, n_slots=4),
        tiny.tokenizer,
        draft=TorchRunner(draft, n_slots=4),
        speculative_k=k,
        resident=resident,
        decode_steps=decode_steps,
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


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("penalty", [1.0, 10.0])
def test_sampling_through_the_engine_has_the_target_distribution(resident, penalty):
    """1,500 seeded requests of 3 tokens with k=2, 16 at a time, on the resident loop (rounds on the device) and on
    the logits path: the joint of (t1, t2) and the marginal of t3, made of acceptances, residual draws and bonus
    tokens over one or two rounds, fit the target's exact probabilities (chi-square at 0.1%; with a repetition
    penalty, over the prompt and the tokens before too), and so does how often t3 repeats t2 (what a penalty that
    missed a round's tokens would get wrong), while the draft's own distribution is far from them (so the test
    could fail)."""
    vocab, n_samples, prompt = 8, 1500 if penalty == 1.0 else 3000, "bfc"
    tokenizer = CharTokenizer.from_corpus("abcdefgh")
    target, draft = sharp_gpt(10, vocab, 16), sharp_gpt(11, vocab, 16)
    counts, third, repeats = torch.zeros(vocab, vocab), torch.zeros(vocab), 0
    params = [
        SamplingParams(max_new_tokens=3, temperature=1.0, repetition_penalty=penalty, seed=seed)
        for seed in range(n_samples)
    ]
    with Engine(
        TorchRunner(target, n_slots=16),
        tokenizer,
        max_queue=n_samples,
        draft=TorchRunner(draft, n_slots=16),
        speculative_k=2,
        resident=resident,
    ) as engine:
        handles = [engine.submit(make_request(prompt, p, tokenizer=tokenizer, context_len=16)) for p in params]
        for handle in handles:
            t1, t2, t3 = _tokens(handle)
            counts[t1, t2] += 1
            third[t3] += 1
            repeats += t3 == t2
        stats = engine.stats()
    assert stats.draft_proposed - stats.draft_accepted > n_samples // 4  # the residual path ran often

    ids = tokenizer.encode(prompt)

    def after(model: GPT, contexts: list[list[int]]) -> torch.Tensor:  # the sampler's distribution after each
        with torch.no_grad():
            return token_probabilities(model(torch.tensor(contexts))[0][:, -1], params[0], contexts)

    def joint(model: GPT) -> tuple[torch.Tensor, torch.Tensor, float]:
        """p(t1, t2) (V, V), p(t3) (V,), p(t3 == t2)."""
        p1 = after(model, [ids])[0]  # (V,)
        p12 = p1[:, None] * after(model, [ids + [a] for a in range(vocab)])  # (V, V)
        p3 = after(model, [ids + [a, b] for a in range(vocab) for b in range(vocab)]).view(vocab, vocab, vocab)
        repeat = float((p12 * p3.diagonal(dim1=1, dim2=2)).sum())
        return p12, (p12[..., None] * p3).sum((0, 1)), repeat

    (p12, p3, repeat), (q12, _, _) = joint(target), joint(draft)
    stat, df = chi2_statistic(counts, p12)
    assert df >= 40 and stat < chi2_critical_999(df), (stat, df)
    stat, df = chi2_statistic(third, p3)
    assert df >= 6 and stat < chi2_critical_999(df), (stat, df)
    assert abs(repeats / n_samples - repeat) < 3.5 * (repeat * (1 - repeat) / n_samples) ** 0.5, (repeats, repeat)
    assert n_samples * float(((q12 - p12) ** 2 / p12).sum()) > 10 * chi2_critical_999(vocab * vocab - 1)


def test_a_draft_that_cannot_serve_is_refused(tiny, pair):
    target = TorchRunner(pair[0], n_slots=4)
    draft = TorchRunner(pair[1], n_slots=4)
    with pytest.raises(ValueError, match=r"speculative k must be an integer in \[1, 32\]"):
        Engine(target, tiny.tokenizer, draft=draft, speculative_k=0)
    with pytest.raises(ValueError, match="the draft runner has 2 slots; the engine needs 4"):
        Engine(target, tiny.tokenizer, draft=TorchRunner(pair[1], n_slots=2))
    other_vocab = TorchRunner(sharp_gpt(0, tiny.tokenizer.vocab_size + 3, 24), n_slots=4)
    with pytest.raises(ValueError, match="must share a tokenizer"):
        Engine(target, tiny.tokenizer, draft=other_vocab)
