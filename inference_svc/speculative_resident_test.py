"""Speculative rounds on the device-resident loop: the vectorised acceptance keeps the target's distribution and the
greedy choice, the round's distributions are the sampler's, and through the engine greedy output equals the target
alone (requests joining at different steps, chunked prompts, stop strings, mixed greedy / sampled batches), a seed
gives the same tokens run after run and whatever shares its batch, cancellation frees slots, and the counts are
sane. On a GPU: the captured rounds equal the eager ones. (inference_svc/speculative_test.py checks the engine's
speculative paths, this one and the logits one, against the target's exact joint distribution.)"""

from __future__ import annotations

import copy

import pytest
import torch

from inference_svc.engine import Engine
from inference_svc.params import make_request
from inference_svc.runner import TorchRunner
from inference_svc.speculative_resident import (
    SpeculativeRunner,
    accept_greedy,
    accept_sampled,
    draw,
    probabilities,
    round_uniforms,
)
from kernels.dispatch import repeat_rows
from inference_svc.testing import SPECULATIVE_PROMPTS, engine_idle, target_and_draft, wait_until
from model.generate import generate_tokens
from model.presets import get_preset
from model.sampling import SamplingParams
from model.speculative import token_probabilities
from model.testing import chi2_critical_999, chi2_statistic
from model.transformer import GPT


PROMPTS = SPECULATIVE_PROMPTS
GPU = torch.cuda.is_available()


@pytest.mark.parametrize("b", [1, 3])
def test_each_row_repeated_is_a_contiguous_tensor(b):
    """The verify's slots: each row k + 1 times, contiguous at every batch (at one row a reshape gave a stride-0 view
    of the runner's row buffer, whose entries past the batch the decode-attention kernel then read)."""
    rows = torch.arange(10, 10 + b)
    got = repeat_rows(rows, 4)
    assert got.is_contiguous() and got.stride() == (1,)
    assert got.tolist() == [10 + i for i in range(b) for _ in range(4)]


def _kernel_runners(pair, **kw) -> list[TorchRunner]:
    """The draft-kernel tests' target and draft runners: on CPU (the kernel in Triton's interpreter); on a GPU, float32
    copies on the device (the kernel compiled; the loop it is compared with in plain float32 ops)."""
    if not GPU:
        return [TorchRunner(m, n_slots=4, **kw) for m in pair]
    return [TorchRunner(copy.deepcopy(m), n_slots=4, device="cuda", dtype=torch.float32, **kw) for m in pair]


@pytest.fixture(scope="module")
def pair(tiny):  # speculative_test's pair has a draft with a shorter context
    """A target and a draft, both with a 64-token context."""
    return target_and_draft(tiny.tokenizer.vocab_size, 64)


def _engine(tiny, pair, n_slots=4, k=3, **kw) -> Engine:
    target, draft = pair
    return Engine(
        TorchRunner(target, n_slots=n_slots),
        tiny.tokenizer,
        max_queue=256,
        draft=TorchRunner(draft, n_slots=n_slots),
        speculative_k=k,
        **kw,
    )


def _request(tiny, prompt, params, **kw):
    return make_request(prompt, params, tokenizer=tiny.tokenizer, context_len=64, **kw)


# The round's pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=0.6, top_k=9, top_p=0.9, repetition_penalty=1.4),
        SamplingParams(temperature=0.0, repetition_penalty=1.4),
    ],
)
def test_probabilities_are_the_samplers(params):
    """The per-row tensor version equals model.speculative.token_probabilities (the reference generator's)."""
    gen = torch.Generator().manual_seed(0)
    N, V = 6, 30
    logits = 3 * torch.randn(N, V, generator=gen)
    contexts = [torch.randint(0, V, (4,), generator=gen).tolist() for _ in range(N)]
    seen = torch.zeros(N, V, dtype=torch.bool)
    for row, ids in enumerate(contexts):
        seen[row, ids] = True
    col = lambda x, dtype=torch.float32: torch.full((N, 1), x, dtype=dtype)  # noqa: E731
    got = probabilities(
        logits,
        seen,
        col(params.repetition_penalty),
        torch.full((N,), params.temperature == 0.0),
        col(params.temperature or 1.0),
        col(params.top_k or V, torch.long),
        col(params.top_p),
    )
    want = token_probabilities(logits, params, contexts)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_draw_follows_the_probabilities_and_never_picks_an_empty_id():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(2))
    u[:3] = torch.tensor([0.0, 1.0 - 2**-24, 0.5])
    ids = draw(probs.expand(len(u), -1), u)
    counts = torch.bincount(ids, minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    stat, df = chi2_statistic(counts[[1, 3, 4]], probs[[1, 3, 4]])
    assert stat < chi2_critical_999(df)
    assert draw(2 * probs[None], torch.tensor([0.99]))[0] == 4  # unnormalised mass is fine


def test_greedy_acceptance_is_the_longest_matching_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 6, 7], [5, 6, 0]])
    target = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [2, 6, 7, 8], [5, 6, 7, 3]])
    accepted, tokens = accept_greedy(drafts, target)
    assert accepted.tolist() == [3, 1, 0, 2]
    for row, n in enumerate(accepted.tolist()):  # accepted drafts, then the target's own token
        assert tokens[row, : n + 1].tolist() == drafts[row, :n].tolist() + [target[row, n].item()]


def test_rejection_sampling_keeps_the_targets_distribution():
    """40,000 rows, each its own seed, k = 2 over 6 ids: the first two emitted tokens' joint fits p (the target's two
    positions; p's second row does not depend on the first token here), where the drafts' own joint does not; the
    acceptance rate is sum(min(p, q)) at the first position."""
    B, k, V = 40000, 2, 6
    gen = torch.Generator().manual_seed(3)
    q1 = torch.softmax(torch.randn(k, V, generator=gen), -1)
    p1 = torch.softmax(torch.randn(k + 1, V, generator=gen), -1)
    p1[0, 5] = 0.0  # an id the target never picks, the draft often does
    p1[0] /= p1[0].sum()
    q, p = q1.expand(B, k, V), p1.expand(B, k + 1, V)
    seed, pos = torch.arange(B), torch.full((B,), 17)
    drafts = torch.stack([draw(q[:, j], torch.rand(B, generator=gen)) for j in range(k)], 1)
    u = round_uniforms(seed, pos, k)  # the round's own draws (the test's drafts come from torch.rand above)
    accepted, tokens = accept_sampled(drafts, q.contiguous(), p.contiguous(), u[:, k : 2 * k], u[:, 2 * k :])
    assert accepted.min() >= 0 and accepted.max() <= k
    emitted = tokens[:, :2]  # every row emits at least 1 token; rows with accepted == 0 emit one
    two = accepted >= 1
    first = torch.bincount(emitted[:, 0], minlength=V).float()
    stat, df = chi2_statistic(first, p1[0])
    assert stat < chi2_critical_999(df) and first[5] == 0
    second = torch.bincount(emitted[two, 1], minlength=V).float()  # given the first was an accepted draft
    stat, df = chi2_statistic(second, p1[1])
    assert stat < chi2_critical_999(df)
    rate = float((accepted >= 1).float().mean())
    assert abs(rate - float(torch.minimum(p1[0], q1[0]).sum())) < 4 * (0.25 / B) ** 0.5
    stat, df = chi2_statistic(torch.bincount(drafts[:, 0], minlength=V).float(), p1[0].clamp(min=1e-9))
    assert stat > 10 * chi2_critical_999(df)  # the draft alone is far from p: the test can fail


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_a_round_leaves_each_row_ready_for_the_next(tiny, pair, full, in_place, k):
    """Runner level: after each round, each slot's next input is its last new token at the next free position, its
    penalty mask holds exactly its context (full rounds), the counts are 1..k+1, and greedy tokens equal the target
    alone's; with attention over the cache in place and the draft on the small-batch kernels' references (the GPU's
    layout: the verify step's b * (k + 1) rows, 3 / 4 / 5 at k = 2 / 3 / 4) or gathered."""
    target, draft = pair
    kernels = dict(attention_in_place=True, small_batch_kernels="reference") if in_place else {}
    t, d = (TorchRunner(m, n_slots=4, **kernels) for m in pair)
    runner = SpeculativeRunner(t, d, k, 4)
    prompts = [tiny.tokenizer.encode(p) for p in PROMPTS[:3]]
    slots = [2, 0, 3]
    greedy = SamplingParams(temperature=0.0)
    params = [greedy, SamplingParams(temperature=0.9, repetition_penalty=1.5, seed=1), greedy] if full else [greedy] * 3
    first = runner.prefill_sample(slots, prompts, params, [5, 6, 7]).tolist()
    got = [[t] for t in first]
    for _ in range(4):
        kv_len = max(len(p) + len(g) for p, g in zip(prompts, got)) + k
        out = runner.round(slots, kv_len, full=full).tolist()
        for row, g in zip(out, got):
            assert 1 <= row[0] <= k + 1
            g += row[1 : 1 + row[0]]
        for slot, prompt, g in zip(slots, prompts, got):
            assert runner.state.token[slot] == g[-1] and runner.state.pos[slot] == len(prompt) + len(g) - 1
            if full:
                assert set(runner.state.seen[slot].nonzero()[:, 0].tolist()) == set(prompt + g)
    for prompt, sp, g in zip(prompts, params, got):
        if sp.temperature == 0.0:
            want = generate_tokens(target, prompt, SamplingParams(max_new_tokens=len(g), temperature=0.0))
            assert g == want


@pytest.mark.parametrize("finish", [False, "triton"])
@pytest.mark.parametrize("full, penalty", [(False, False), (True, False), (True, True)])
def test_padded_rows_of_a_captured_round_touch_only_the_scratch_slots(tiny, pair, full, penalty, finish):
    """What a round graph records (`_round_step`, run eagerly here: the capture itself is tested on the GPU) with the
    bucket's padded rows on each model's scratch slot: the real rows get the tokens and state of an unpadded round
    (without `finish_kernel`; the padded one with it, "triton": the interpreter on CPU; on a GPU the compiled kernel
    over float32 runners there), and the scratch slot stays at position 0 (so replays never run past the cache). The
    output goes to the buffer given, as the graph's does."""
    runners = []
    on_gpu = dict(device="cuda", dtype=torch.float32, cuda_graphs=False) if GPU else {}
    models = [copy.deepcopy(m) for m in pair] if GPU else pair
    for n_draft_slots, option in ((4, False), (6, finish)):  # the draft's scratch slot need not be the target's
        t, d = TorchRunner(models[0], n_slots=4, **on_gpu), TorchRunner(models[1], n_slots=n_draft_slots, **on_gpu)
        runners.append(SpeculativeRunner(t, d, 2, 4, finish_kernel=True if option and GPU else option))
    slots, prompts = [3, 1], [tiny.tokenizer.encode(p) for p in PROMPTS[:2]]
    sampled = SamplingParams(temperature=0.9, top_k=6, seed=3, repetition_penalty=1.6 if penalty else 1.0)
    params = [SamplingParams(temperature=0.0), sampled] if full else [SamplingParams(temperature=0.0)] * 2
    plain, padded = runners
    for r in runners:
        r.prefill_sample(slots, prompts, params, [1, 2])
    device = plain.device
    rows = torch.tensor([*slots, 4, 4], device=device)  # the bucket of 4: two padded rows on the target's scratch slot
    draft_rows = torch.tensor([*slots, 6, 6], device=device)  # and the draft's (6)
    for _ in range(3):
        want = plain.round(slots, 40, full)
        out = torch.full((4, 4), -1, device=device)
        got = padded._round_step(rows, draft_rows, 40, full, penalty, out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out[:2], want)
        for name in ("token", "pos", "seen"):
            assert torch.equal(getattr(padded.state, name)[slots], getattr(plain.state, name)[slots]), name
        assert torch.equal(padded._prev[slots], plain._prev[slots])
        assert padded.state.pos[4] == 0


def _rounds_agree(runners, slots, prompts, params, k: int, full: bool, rounds: int = 4) -> None:
    """Prefill the same prompts into each runner, then `rounds` rounds: every runner's counts and tokens equal."""
    got = [[[t] for t in r.prefill_sample(slots, prompts, params, [5, 6, 7]).tolist()] for r in runners]
    for _ in range(rounds):
        kv_len = max(len(p) + len(g) for p, g in zip(prompts, got[0])) + k
        outs = [r.round(slots, kv_len, full=full).tolist() for r in runners]
        assert all(out == outs[0] for out in outs)
        for out, run in zip(outs, got):
            for row, g in zip(out, run):
                g += row[1 : 1 + row[0]]


@pytest.mark.parametrize("full", [False, True])
def test_the_draft_kernels_round_equals_the_draft_loops(tiny, pair, full):
    """Runner level, draft_kernel="triton" (the interpreter on CPU) against the draft's steps one by one: greedy rows
    and temperature-only sampled rows (where the kernel's q is the loop's) give the same counts and tokens, round
    after round, and a penalised row (whose q the kernel leaves at temperature only) keeps its context mask exact."""
    k = 3
    prompts = [tiny.tokenizer.encode(p) for p in PROMPTS[:3]]
    slots = [2, 0, 3]
    greedy = SamplingParams(temperature=0.0)
    params = [greedy, SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.3, seed=2)]
    params = params if full else [greedy] * 3
    plain = dict(cuda_graphs=False, attention_in_place=False, small_batch_kernels=False) if GPU else {}
    runners = [
        SpeculativeRunner(*_kernel_runners(pair, **plain), k, 4, draft_kernel=option) for option in (False, "triton")
    ]
    _rounds_agree(runners, slots, prompts, params, k, full)
    caches = [r.draft.cache for r in runners]  # the draft's keys and values, written by the kernel / the loop
    for slot in slots:  # up to the token before each row's next input: the loop leaves that one to the next round
        held = slice(0, int(runners[0].state.pos[slot]) - 1)
        torch.testing.assert_close(
            caches[1].k[slot, ..., held, :], caches[0].k[slot, ..., held, :], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            caches[1].v[slot, ..., held, :], caches[0].v[slot, ..., held, :], atol=1e-4, rtol=1e-4
        )
    if full:  # a penalised row: the kernel's drafts ignore the penalty, the round's output and masks stay exact
        penalised = SamplingParams(temperature=0.9, repetition_penalty=1.5, seed=3)
        runner = runners[1]
        runner.prefill_sample([1], [prompts[0]], [penalised], [9])
        mine = [runner.state.token[1].item()]
        for _ in range(3):
            row = runner.round([1], len(prompts[0]) + len(mine) + k, full=True).tolist()[0]
            assert 1 <= row[0] <= k + 1
            mine += row[1 : 1 + row[0]]
            assert set(runner.state.seen[1].nonzero()[:, 0].tolist()) == set(prompts[0] + mine)
            assert runner.state.token[1] == mine[-1] and runner.state.pos[1] == len(prompts[0]) + len(mine) - 1


def _mixed_rounds(tiny, full: bool):
    """k, slots, prompts and params of the runner-level comparisons: three rows, greedy (or, when `full`, one greedy
    and two sampled: temperature only, and temperature with top-k)."""
    prompts = [tiny.tokenizer.encode(p) for p in PROMPTS[:3]]
    greedy = SamplingParams(temperature=0.0)
    params = [greedy, SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.3, top_k=7, seed=2)]
    return 3, [2, 0, 3], prompts, params if full else [greedy] * 3


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("full", [False, True])
def test_carrying_the_last_drafts_keys_equals_a_forward_of_their_own(tiny, pair, full, in_place):
    """Runner level, carry_draft (the default: k draft forwards a round, d_k's keys and values written by the next
    round's first forward beside its input, at pos - 1) against k + 1 forwards: the same counts and tokens round after
    round (greedy and sampled rows, a first round right after the prefill), and the drafts' caches alike up to each
    row's last token (which the carrying runner writes with its next round)."""
    k, slots, prompts, params = _mixed_rounds(tiny, full)
    kw = dict(attention_in_place=True, small_batch_kernels="reference") if in_place else {}
    runners = [
        SpeculativeRunner(*(TorchRunner(m, n_slots=4, **kw) for m in pair), k, 4, carry_draft=carry)
        for carry in (False, True)
    ]
    _rounds_agree(runners, slots, prompts, params, k, full, rounds=5)
    caches = [r.draft.cache for r in runners]
    for slot in slots:  # positions before the last token (at pos - 1, which the carrying runner writes next round)
        held = int(runners[0].state.pos[slot]) - 1
        for name in ("k", "v"):
            mine, theirs = (getattr(c, name)[slot, :, :, :held] for c in (caches[1], caches[0]))
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="carry_draft"):
        SpeculativeRunner(*(TorchRunner(m, n_slots=4) for m in pair), k, 4, carry_draft="yes")


@pytest.mark.parametrize("full, penalty", [(False, False), (True, False), (True, True)])
def test_the_round_s_sampling_kernels_give_the_draws_of_their_references(tiny, pair, full, penalty):
    """Runner level, sample_kernels="triton" (the round's uniforms and each draft step's draw in one launch each, the
    interpreter on CPU; on a GPU the compiled kernels over float32 runners there) against the torch chains: the same
    counts, tokens and context masks round after round, over greedy, temperature-only, top-k and (with `penalty`)
    repetition-penalised rows; greedy-only rounds (not `full`) draw each draft by `draft_sample`'s one-hot too."""
    k, slots, prompts, params = _mixed_rounds(tiny, full)
    if penalty:
        params[1] = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.5, seed=4)
    plain = dict(cuda_graphs=False) if GPU else {}  # on a GPU: float32 runners there, the kernels compiled
    runners = [
        SpeculativeRunner(*_kernel_runners(pair, **plain), k, 4, sample_kernels=option)
        for option in (False, True if GPU else "triton")
    ]
    _rounds_agree(runners, slots, prompts, params, k, full, rounds=5)
    assert torch.equal(runners[0].state.seen[slots], runners[1].state.seen[slots])
    with pytest.raises(ValueError, match="sample_kernels"):
        SpeculativeRunner(*(TorchRunner(m, n_slots=4) for m in pair), k, 4, sample_kernels="fast")


@pytest.mark.parametrize("carry", [True, False])
@pytest.mark.parametrize("full, penalty", [(False, False), (True, False), (True, True)])
def test_the_finish_kernel_gives_the_rounds_of_the_torch_tail(tiny, pair, full, penalty, carry):
    """Runner level, finish_kernel (the round's tail in one launch: "triton", the interpreter on CPU; on a GPU True,
    float32 runners there, the rounds captured) against the torch ops: the same counts and tokens, and the same slot
    state (next input, position, context mask, the draft's carried token), round after round, over greedy rounds
    and full ones (greedy, temperature-only, top-k rows; with `penalty` a repetition-penalised row)."""
    k, slots, prompts, params = _mixed_rounds(tiny, full)
    if penalty:
        params[1] = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.5, seed=4)
    runners = [
        SpeculativeRunner(*_kernel_runners(pair), k, 4, carry_draft=carry, finish_kernel=option)
        for option in (False, True if GPU else "triton")
    ]
    got = [[[t] for t in r.prefill_sample(slots, prompts, params, [5, 6, 7]).tolist()] for r in runners]
    for _ in range(4):
        kv_len = max(len(p) + len(g) for p, g in zip(prompts, got[0])) + k
        outs = [r.round(slots, kv_len, full=full).tolist() for r in runners]
        assert outs[1] == outs[0]
        for name in ("token", "pos", "seen"):
            mine, theirs = (getattr(r.state, name)[slots] for r in runners)
            assert torch.equal(mine, theirs), name
        assert torch.equal(runners[1]._prev[slots], runners[0]._prev[slots])
        for out, run in zip(outs, got):
            for row, g in zip(out, run):
                g += row[1 : 1 + row[0]]
    if not full:  # greedy rounds: the target alone's tokens
        target = pair[0]  # the CPU model (the runners may hold copies on the GPU)
        for prompt, g in zip(prompts, got[1]):
            want = generate_tokens(target, prompt, SamplingParams(max_new_tokens=len(g), temperature=0.0))
            assert g == want


def test_the_finish_kernel_refuses_a_bad_option_and_an_engine_without_a_draft(tiny, pair):
    with pytest.raises(ValueError, match="finish_kernel"):
        SpeculativeRunner(*(TorchRunner(m, n_slots=2) for m in pair), 2, 2, finish_kernel="fast")
    with pytest.raises(ValueError, match="finish_kernel needs a draft"):
        Engine(TorchRunner(pair[0], n_slots=2), tiny.tokenizer, finish_kernel=True)


def test_rounds_past_eight_rows_take_a_forward_for_the_last_drafts_keys_and_keep_the_carry_right(
    tiny, pair, monkeypatch
):
    """A carrying runner carries only while the first step's 2b rows fit the small-batch kernels (b <= 8): rounds of
    9 rows take k + 1 forwards (no shared-slot step), then rounds of 3 of those rows carry again, from the token each
    9-row round left at pos - 1; every round's tokens equal the non-carrying runner's."""
    shared = []
    forward_cached = GPT.forward_cached

    def spy(self, *args, **kw):
        if self is pair[1]:
            shared.append(kw.get("rows_share_slots", False))
        return forward_cached(self, *args, **kw)

    k, n = 2, 9
    runners = [
        SpeculativeRunner(*(TorchRunner(m, n_slots=n) for m in pair), k, n, carry_draft=c) for c in (False, True)
    ]
    prompts = [tiny.tokenizer.encode(PROMPTS[i % len(PROMPTS)])[: 6 + i] for i in range(n)]
    params = [SamplingParams(temperature=0.0)] * n
    got = [[[t] for t in r.prefill_sample(list(range(n)), prompts, params, list(range(n))).tolist()] for r in runners]
    monkeypatch.setattr(GPT, "forward_cached", spy)
    for slots, carried in ((list(range(n)), False), ([4, 0, 7], True)):
        for _ in range(2):
            kv_len = max(len(prompts[s]) + len(got[0][s]) for s in slots) + k
            shared.clear()
            outs = [r.round(slots, kv_len, full=False).tolist() for r in runners]
            assert outs[0] == outs[1]
            assert shared == [False] * (k + 1) + ([True] + [False] * (k - 1) if carried else [False] * (k + 1))
            for row, s in zip(outs[0], slots):
                for run in got:
                    run[s] += row[1 : 1 + row[0]]


@pytest.mark.parametrize("full", [False, True])
def test_the_verify_on_small_batch_kernels_equals_the_plain_verify(tiny, pair, full, monkeypatch):
    """Runner level, verify_kernels (the target's small-batch decode kernels; "triton": the interpreter on CPU) against
    the verify over the cache in place: the same counts and tokens round after round, the target's caches alike,
    and every verify took the small-batch step with its rows sharing slots. (The interpreter runs a launch's
    programs in row order, so the race that write_first prevents cannot show here: kernels/decode_attention_step_test
    lists a slot's rows in reverse for that.)"""
    verifies = []
    small_batch_step = GPT._small_batch_step

    def spy(self, *args):
        verifies.append((self, args[-1]))  # the model, rows_share_slots
        return small_batch_step(self, *args)

    monkeypatch.setattr(GPT, "_small_batch_step", spy)
    k, slots, prompts, params = _mixed_rounds(tiny, full)
    kw = dict(attention_in_place=True, small_batch_kernels=True if GPU else "triton")
    kw.update(cuda_graphs=False) if GPU else None
    runners = [SpeculativeRunner(*_kernel_runners(pair, **kw), k, 4, verify_kernels=on) for on in (False, True)]
    _rounds_agree(runners, slots, prompts, params, k, full)
    targets = [shared for model, shared in verifies if any(model is r.target.model for r in runners)]
    assert (
        targets.count(True) == 4
    )  # each round's verify (the prefills': no shared slots; the draft's first steps share)
    caches = [r.target.cache for r in runners]
    torch.testing.assert_close(caches[1].k[slots], caches[0].k[slots], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1].v[slots], caches[0].v[slots], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="verify_kernels"):
        SpeculativeRunner(*_kernel_runners(pair), k, 4, verify_kernels="yes")


def test_the_draft_kernel_refuses_a_draft_it_cannot_run_and_an_engine_without_a_draft(tiny, pair):
    gpt2 = GPT(get_preset("shakespeare-char", n_layer=1, n_head=2, n_embd=32, vocab_size=pair[0].config.vocab_size))
    with pytest.raises(ValueError, match="Llama-style"):
        SpeculativeRunner(TorchRunner(pair[0], n_slots=2), TorchRunner(gpt2.eval(), n_slots=2), 2, 2, draft_kernel=True)
    with pytest.raises(ValueError, match="draft_kernel"):
        SpeculativeRunner(*(TorchRunner(m, n_slots=2) for m in pair), 2, 2, draft_kernel="fast")
    with pytest.raises(ValueError, match="draft_kernel needs a draft"):
        Engine(TorchRunner(pair[0], n_slots=2), tiny.tokenizer, draft_kernel=True)


def test_the_accept_kernel_refuses_a_bad_option_and_an_engine_without_a_draft(tiny, pair):
    with pytest.raises(ValueError, match="accept_kernel"):
        SpeculativeRunner(*(TorchRunner(m, n_slots=2) for m in pair), 2, 2, accept_kernel="fast")
    with pytest.raises(ValueError, match="accept_kernel needs a draft"):
        Engine(TorchRunner(pair[0], n_slots=2), tiny.tokenizer, accept_kernel=True)


# Through the engine ------------------------------------------------------------------------------------


def test_greedy_equals_the_target_alone_with_requests_joining_at_different_steps(tiny, pair):
    target, _ = pair
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (20, 33, 9, 26, 5, 40)]
    with _engine(tiny, pair, n_slots=4, k=2) as engine:
        first = engine.submit(_request(tiny, PROMPTS[0], params[0]))
        head = [first.next_chunk() for _ in range(3)]  # decoding (a few rounds in) when the others come
        handles = [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS[1:3], params[1:3])]
        early = handles[0].next_chunk()  # the second wave is streaming when the third comes
        handles += [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS[3:], params[3:])]
        got = [[t for c in head + list(first) for t in c.token_ids]]
        got += [
            list(early.token_ids + h.result().token_ids) if i == 0 else list(h.result().token_ids)
            for i, h in enumerate(handles)
        ]
        stats = engine.stats()
    for prompt, sp, tokens in zip(PROMPTS, params, got):
        assert tokens == generate_tokens(target, tiny.tokenizer.encode(prompt), sp), prompt
    assert stats.draft_proposed > 0 and 0 < stats.draft_accepted < stats.draft_proposed
    assert stats.draft_proposed % 2 == 0  # k per round and row


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_equals_the_target_alone_on_the_gpus_kernel_layout_with_a_shorter_draft_context(tiny, k):
    """The GPU's layout on the CPU (attention over the cache in place; the draft's steps and the plain steps on the
    small-batch kernels' references), k = 2 and 4 (the verify step's 3 and 5 rows a slot), and a draft context (32)
    shorter than the target's (64): rounds until position 32 - k, plain steps after; the tokens equal the target
    alone's, and the draft is accepted sometimes, not always."""
    target, draft = target_and_draft(tiny.tokenizer.vocab_size, 32)
    kernels = dict(attention_in_place=True, small_batch_kernels="reference")
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (36, 20, 9, 30)]
    with Engine(
        TorchRunner(target, n_slots=4, **kernels),
        tiny.tokenizer,
        max_queue=256,
        draft=TorchRunner(draft, n_slots=4, **kernels),
        speculative_k=k,
    ) as engine:
        got = [
            list(h.result().token_ids) for h in [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS, params)]
        ]
        stats = engine.stats()
    for prompt, sp, tokens in zip(PROMPTS, params, got):
        assert tokens == generate_tokens(target, tiny.tokenizer.encode(prompt), sp), prompt
    assert 0 < stats.draft_accepted < stats.draft_proposed and stats.draft_proposed % k == 0


def test_the_engine_with_the_draft_kernel_gives_the_tokens_it_gives_without(tiny, pair):
    """Through the engine, draft_kernel="triton" (the interpreter on CPU): greedy rows equal the target alone, and a
    mixed batch (greedy, temperature-only seeded rows) gives the same tokens and acceptance as the draft loop. On a GPU
    (float32, the kernel inside the captured rounds): the greedy rows' tokens equal the loop engine's."""
    target, _ = pair
    greedy = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (20, 9, 26)]
    sampled = [SamplingParams(max_new_tokens=24, temperature=t, seed=s) for t, s in ((0.8, 4), (1.2, 5))]
    results = []
    for option in (False, "triton"):
        t, d = _kernel_runners(pair)  # on a GPU: CUDA graphs, the kernel captured in the round graphs
        with Engine(t, tiny.tokenizer, max_queue=256, draft=d, speculative_k=3, draft_kernel=option) as engine:
            handles = [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS, greedy + sampled)]
            results.append(([list(h.result().token_ids) for h in handles], engine.stats()))
    (loop, loop_stats), (kernel, kernel_stats) = results
    assert 0 < kernel_stats.draft_accepted < kernel_stats.draft_proposed
    if GPU:  # the loop's draft steps round otherwise (small-batch kernels): the greedy rows' tokens are the target's
        assert kernel[:3] == loop[:3]
        return
    assert kernel == loop
    assert (kernel_stats.draft_proposed, kernel_stats.draft_accepted) == (
        loop_stats.draft_proposed,
        loop_stats.draft_accepted,
    )
    for prompt, sp, tokens in zip(PROMPTS, greedy, kernel):
        assert tokens == generate_tokens(target, tiny.tokenizer.encode(prompt), sp), prompt


def test_greedy_rows_in_a_sampled_round_still_equal_the_target(tiny, pair):
    """A batch with sampled rows runs the full graph: its greedy rows go through the rejection rule with one-hot
    distributions, which must give the longest matching prefix and the target's argmax, as the greedy graph does."""
    target, _ = pair
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=6, seed=4)
    with _engine(tiny, pair) as engine:
        handles = [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS[:4], [greedy, sampled] * 2)]
        got = [list(h.result().token_ids) for h in handles]
    for prompt, tokens in zip(PROMPTS[0:4:2], got[0::2]):
        assert tokens == generate_tokens(target, tiny.tokenizer.encode(prompt), greedy)


def test_chunked_prompts_reach_the_draft_too(tiny, pair):
    """Prompts longer than a prefill chunk go into both caches chunk by chunk: a perfect draft (the target itself)
    is then always accepted, and the tokens equal the target alone's."""
    target, _ = pair
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts = [PROMPTS[3], PROMPTS[1]]  # 26 and 18 characters, chunks of 5
    with _engine(tiny, (target, copy.deepcopy(target)), prefill_chunk=5) as engine:
        got = [list(h.result().token_ids) for h in [engine.submit(_request(tiny, p, params)) for p in prompts]]
        stats = engine.stats()
    for prompt, tokens in zip(prompts, got):
        assert tokens == generate_tokens(target, tiny.tokenizer.encode(prompt), params)
    assert stats.draft_proposed > 0 and stats.draft_accepted == stats.draft_proposed


def test_a_stop_string_drops_the_rounds_tokens_past_it(tiny, pair):
    """A stop string met inside a round: the text ends where the engine without a draft ends it."""
    target, _ = pair
    with Engine(TorchRunner(target, n_slots=2), tiny.tokenizer) as plain:
        free = plain.submit(_request(tiny, PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=0.0))).result()
        params = SamplingParams(max_new_tokens=40, temperature=0.0, stop=(free.text[9:11],))  # met mid-way
        want = [plain.submit(_request(tiny, p, params)).result() for p in PROMPTS[:3]]
    with _engine(tiny, pair, k=4) as engine:
        got = [engine.submit(_request(tiny, p, params)).result() for p in PROMPTS[:3]]
    for g, w in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    assert want[0].finish_reason.value == "stop" and len(want[0].token_ids) < 40


def test_a_seed_gives_the_same_tokens_run_after_run_and_whatever_shares_its_batch(tiny, pair):
    seeded = SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=21)
    others = [SamplingParams(max_new_tokens=15 + 7 * i, temperature=1.1, top_k=5) for i in range(3)]
    runs = []
    for crowd in (0, 3, 3):
        with _engine(tiny, pair) as engine:
            handles = [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS[1:], others[:crowd])]
            runs.append(list(engine.submit(_request(tiny, PROMPTS[0], seeded)).result().token_ids))
            for h in handles:
                h.result()
    assert len(runs[0]) == 40 and runs[0] == runs[1] == runs[2]


def test_cancellation_frees_the_slots(tiny, pair):
    long = SamplingParams(max_new_tokens=60, temperature=0.0)
    with _engine(tiny, pair, n_slots=2) as engine:
        handles = [engine.submit(_request(tiny, p, long)) for p in PROMPTS[:4]]  # two wait for a slot
        handles[0].next_chunk()
        for h in handles[:3]:
            h.cancel()
        assert handles[3].result().finish_reason.value == "length"
        assert all(h.result().finish_reason.value == "cancelled" for h in handles[:3])
        assert wait_until(lambda: engine_idle(engine))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("k", [2, 3, 4])
def test_captured_rounds_equal_the_eager_rounds_on_gpu(tiny, pair, k):
    """The same rounds, eager and replayed from their graphs (3 rows in the bucket of 4; a row leaves mid-way), in
    bf16 on the GPU: the same counts and tokens, greedy and sampled; the verify step's rows: 12, 16, 20 at k = 2, 3,
    4 (3 rows and 5 rows a slot: decode attention at row counts that are not powers of two)."""
    runners = []
    for graphs in (False, True):
        target, draft = (copy.deepcopy(m) for m in pair)
        t = TorchRunner(target, n_slots=6, device="cuda", cuda_graphs=graphs, attention_in_place=True)
        d = TorchRunner(draft, n_slots=6, device="cuda", cuda_graphs=graphs, attention_in_place=True)
        runners.append(SpeculativeRunner(t, d, k, 6))
    slots, prompts = [0, 1, 5], [tiny.tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=6, seed=2)] * 2
    for full in (False, True):
        ps = params[:3] if full else [params[0]] * 3
        firsts = [r.prefill_sample(slots, prompts, ps, [1, 2, 3]).tolist() for r in runners]
        assert firsts[0] == firsts[1]
        for step in range(6):
            rows = slots if step < 3 else slots[:2]
            # the graphs' span (the target's context): the eager rounds attend over the same keys, in the same blocks
            a, b = (r.round(rows, 64, full).tolist() for r in runners)
            assert a == b, f"full={full} step {step}"
    assert ("speculative", k, 4, 64, True, False) in runners[1].target._graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("k", [2, 3, 4])
def test_greedy_through_the_engine_on_gpu_equals_the_engine_without_a_draft(tiny, pair, k):
    """bf16 on the GPU: the round's verify step (k + 1 positions) and the plain step may round differently, so the
    reference is the same engine without a draft; the test models' logits are spread, so the choices agree."""
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (20, 33, 9, 26)]
    results = []
    for with_draft in (False, True):
        target, draft = (copy.deepcopy(m) for m in pair)
        runner = TorchRunner(target, n_slots=4, device="cuda")
        drafter = TorchRunner(draft, n_slots=4, device="cuda") if with_draft else None
        with Engine(runner, tiny.tokenizer, draft=drafter, speculative_k=k) as engine:
            handles = [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS, params)]
            results.append([list(h.result().token_ids) for h in handles])
            stats = engine.stats()
    assert results[0] == results[1]
    assert stats.draft_proposed > 0 and 0 < stats.draft_accepted <= stats.draft_proposed


# Runners over shared models (the root cause of the GPU bench's k = 2 rows, 1c6034e) ----------------------------------


def _fused_weights(models) -> list[torch.Tensor]:
    """Every block's fused q/k/v weight and bias (`Attention.fuse_qkv`, made by `TorchRunner`): what a captured graph
    reads by address."""
    return [t for m in models for block in m.blocks for t in block.attn.qkv if t is not None]


def test_a_second_runner_over_the_same_models_keeps_the_fused_weights_of_the_first(pair):
    """A CUDA graph reads the fused q/k/v weights by address and holds no reference to them. The speculative bench
    builds an engine per k over ONE target and ONE draft; each TorchRunner fused again, so the k = 2 engine (built
    between k = 0 and k = 4) replayed graphs over freed memory: acceptance 0.00, tokens not the target's. A fresh
    copy is kept now (same tensors, same storage); a cast still makes a new one, in the weights' dtype."""
    models = [copy.deepcopy(m) for m in pair]
    SpeculativeRunner(*(TorchRunner(m, n_slots=2) for m in models), 2, 2)
    first = [(w, w.data_ptr()) for w in _fused_weights(models)]
    SpeculativeRunner(*(TorchRunner(m, n_slots=2) for m in models), 4, 2)
    again = _fused_weights(models)
    assert len(again) == len(first) > 0
    assert all(w is old and w.data_ptr() == ptr for w, (old, ptr) in zip(again, first))
    TorchRunner(models[0].to(torch.float64), n_slots=2)  # a cast swaps the parameters' storage
    assert all(w.dtype == torch.float64 for w in _fused_weights(models[:1]))


def _fill(numel: int) -> int:
    """Copies of a bf16 tensor of `numel` that take about 8 MiB (at least 16)."""
    return max(16, (8 << 20) // (2 * numel))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_engines_built_one_after_another_over_the_same_models_keep_their_graphs_on_gpu(tiny, pair):
    """The speculative bench's layout: an engine without a draft, then k = 2, then k = 4, over the SAME target and
    draft (not copies), each capturing its graphs at start; then free GPU memory is scribbled over with NaN (what
    later allocations did to the weights a second runner freed). Every engine still gives the tokens of an engine
    over models of its own, and its rounds accept drafts."""
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (20, 33, 9, 26)]

    def run(engine: Engine) -> list[list[int]]:
        return [
            list(h.result().token_ids) for h in [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS, params)]
        ]

    with Engine(TorchRunner(copy.deepcopy(pair[0]), n_slots=4, device="cuda"), tiny.tokenizer) as alone:
        want = run(alone)
    target, draft = (copy.deepcopy(m) for m in pair)
    engines = {
        k: Engine(
            TorchRunner(target, n_slots=4, device="cuda"),
            tiny.tokenizer,
            draft=TorchRunner(draft, n_slots=4, device="cuda") if k else None,
            speculative_k=max(k, 1),
        )
        for k in (0, 2, 4)
    }
    try:
        sizes = {w.numel() for w in _fused_weights((target, draft))}
        # enough copies of each size to fill the small pool's 2 MiB segments, so a freed block of it is found
        junk = [
            torch.full((n,), float("nan"), dtype=torch.bfloat16, device="cuda") for n in sizes for _ in range(_fill(n))
        ]
        torch.cuda.synchronize()
        del junk
        for k, engine in engines.items():
            assert run(engine) == want, f"k={k}"
            if k:
                stats = engine.stats()
                assert 0 < stats.draft_accepted <= stats.draft_proposed, f"k={k}"
    finally:
        for engine in engines.values():
            engine.close()


@pytest.mark.parametrize("penalty", [False, True])
def test_the_engine_with_the_accept_kernel_gives_the_tokens_it_gives_without(tiny, pair, penalty):
    """Through the engine, accept_kernel="triton" (the interpreter on CPU; on a GPU compiled, inside the captured
    rounds, float32 models): a batch of seeded sampled rows (top-k, top-p, temperatures; with `penalty` repetition
    penalties, so each round reads and keeps the context masks) and a greedy row gives the same tokens, and the same
    acceptance, as the reference acceptance (accept_kernel=False), the draft kernel on and off."""
    rate = 1.5 if penalty else 1.0
    params = [
        SamplingParams(max_new_tokens=22, temperature=0.9, top_k=8, seed=4, repetition_penalty=rate),
        SamplingParams(max_new_tokens=18, temperature=1.3, top_p=0.8, seed=5),
        SamplingParams(max_new_tokens=20, temperature=0.7, top_k=20, top_p=0.95, seed=6, repetition_penalty=rate),
        SamplingParams(max_new_tokens=12, temperature=0.0),
    ]
    results = []
    options = [(False, False), (False, "triton")] + [("triton", "triton")] * penalty  # the draft kernel's q too
    for draft_kernel, accept_kernel in options:
        t, d = _kernel_runners(pair)
        with Engine(
            t,
            tiny.tokenizer,
            max_queue=256,
            draft=d,
            speculative_k=3,
            draft_kernel=draft_kernel,
            accept_kernel=accept_kernel,
        ) as engine:
            handles = [engine.submit(_request(tiny, p, sp)) for p, sp in zip(PROMPTS, params)]
            tokens = [list(h.result().token_ids) for h in handles]
            stats = engine.stats()
        results.append((tokens, (stats.draft_proposed, stats.draft_accepted)))
    (reference, ref_counts), (kernel, counts), *with_draft_kernel = results
    assert 0 < ref_counts[1] < ref_counts[0]  # drafts accepted sometimes, not always
    assert kernel == reference and counts == ref_counts
    for tokens, _ in with_draft_kernel:  # its q is another (temperature only): other tokens, as many
        assert [len(t) for t in tokens] == [sp.max_new_tokens for sp in params]
