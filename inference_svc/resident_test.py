"""The device-resident decode loop: the sampler inside the step draws what the host sampler (and so the reference
generator) draws, a seed's tokens do not depend on the batch, both engine paths agree, and on a GPU the captured
graphs equal the eager step."""

from __future__ import annotations

import pytest
import torch

from inference_svc.engine import DECODE_STEPS_SMALL_BATCH, Engine
from inference_svc.params import make_request
from inference_svc.runner import SlotState, Staging, TorchRunner
from model.generate import generate_tokens
from model.sampling import SamplingParams, sample

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=5, seed=1),
    SamplingParams(temperature=1.0, top_p=0.9, seed=2),
    SamplingParams(temperature=0.0, repetition_penalty=1.5),
    SamplingParams(temperature=1.2, top_k=8, top_p=0.8, repetition_penalty=1.3, seed=3),
    SamplingParams(temperature=0.7, seed=2**62 + 5),
]


def test_slot_state_draws_what_the_host_sampler_draws():
    V, n_slots = 40, 9
    state = SlotState(n_slots, V, torch.device("cpu"))
    state.allow(37)  # a model vocabulary padded beyond the tokenizer's
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([7, 0, 3, 5, 1, 8])
    prompts = [torch.randint(0, 37, (n,), generator=gen).tolist() for n in (3, 1, 6, 2, 5, 4)]
    seeds = [p.seed if p.seed is not None else 99 for p in PARAMS]
    state.admit(Staging(torch.device("cpu")), slots, PARAMS, seeds, prompts)
    contexts = [list(p) for p in prompts]
    for step in range(30):
        logits = 3 * torch.randn(len(PARAMS), V, generator=gen)
        logits[:, 37:] += 100.0  # padded ids would win if they were not blocked
        counters = torch.tensor([len(c) for c in contexts])
        got = state.sample(logits.clone(), slots, counters, full=True)
        masked = logits.clone()
        masked[:, 37:] = float("-inf")
        want = sample(masked, PARAMS, seeds, counters.tolist(), contexts)
        assert torch.equal(got, want), f"step {step}"
        state.advance(slots, got, counters, full=True)
        for c, t in zip(contexts, got.tolist()):
            c.append(t)
    assert torch.equal(state.token[slots], got) and torch.equal(state.pos[slots], counters)
    greedy = state.sample(logits.clone(), slots, counters, full=False)
    assert torch.equal(greedy, masked.argmax(-1))


def _run(engine, tiny, cases):
    handles = [
        engine.submit(make_request(p, s, tokenizer=tiny.tokenizer, context_len=tiny.model.config.block_size))
        for p, s in cases
    ]
    return [list(h.result().token_ids) for h in handles]


CASES = [
    ("to be", SamplingParams(max_new_tokens=14, temperature=0.0)),
    ("or not to be: that", SamplingParams(max_new_tokens=30, temperature=0.9, top_k=6, seed=11)),
    ("t", SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.85, repetition_penalty=1.2, seed=12)),
    ("whether 'tis", SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.4)),
    ("the question", SamplingParams(max_new_tokens=16, temperature=0.6, seed=13)),
]


def test_both_engine_paths_and_the_reference_agree(tiny):
    runner = TorchRunner(tiny.model, n_slots=3)
    results = []
    for resident, steps in ((True, 1), (True, 4), (False, 1)):  # 4: multi-step decode (several tokens per launch)
        with Engine(runner, tiny.tokenizer, max_queue=64, resident=resident, decode_steps=steps) as engine:
            results.append(_run(engine, tiny, CASES * 2))
    assert results[0] == results[1] == results[2]
    for (prompt, params), ids in zip(CASES * 2, results[0]):
        assert ids == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)


def test_a_seed_gives_the_same_tokens_whatever_shares_its_batch(tiny):
    seeded = ("or not", SamplingParams(max_new_tokens=40, temperature=1.0, seed=5))
    others = [(p, SamplingParams(max_new_tokens=25 + i, temperature=1.1)) for i, (p, _) in enumerate(CASES)]
    with Engine(TorchRunner(tiny.model, n_slots=6), tiny.tokenizer, max_queue=64) as engine:
        (alone,) = _run(engine, tiny, [seeded])
        crowded = _run(engine, tiny, [*others[:2], seeded, *others[2:]])[2]
        again = _run(engine, tiny, [seeded, *others])[0]
    assert alone == crowded == again


def test_resident_runner_refuses_what_it_cannot_do(tiny):
    class LogitsOnly:  # a runner without the device-resident calls (like the ONNX Runtime runner)
        n_slots, max_len, vocab_size, device = 2, 64, 65, torch.device("cpu")

    with pytest.raises(ValueError, match="resident=True needs a runner with decode_sample"):
        Engine(LogitsOnly(), tiny.tokenizer, resident=True)


def test_attention_in_place_equals_the_gather(tiny):
    model, cache_runner = tiny.model, TorchRunner(tiny.model, n_slots=4)
    prompts = {2: [1, 2, 3, 4, 5, 6], 0: [7], 3: [8, 9, 10]}
    cache_runner.prefill(list(prompts), list(prompts.values()))
    device = cache_runner.device  # the runner moved the (shared) model there
    slots = torch.tensor(list(prompts), device=device)
    positions = torch.tensor([len(p) for p in prompts.values()], device=device)
    tokens = torch.tensor([[11], [12], [13]], device=device)
    with torch.no_grad():
        # Same cache, same new tokens, written at the same positions by both: only the attention differs.
        gather = model.forward_cached(tokens, cache_runner.cache, slots, positions, kv_len=8)
        in_place = model.forward_cached(tokens, cache_runner.cache, slots, positions, kv_len=8, attention_in_place=True)
    torch.testing.assert_close(in_place, gather, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_resident_graphs_equal_the_eager_resident_step_on_gpu(tiny):
    eager = TorchRunner(tiny.copy(), n_slots=6, device="cuda", cuda_graphs=False, attention_in_place=True)
    graphs = TorchRunner(tiny.copy(), n_slots=6, device="cuda", cuda_graphs=True)
    slots, prompts = [0, 1, 5], [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    params = [PARAMS[0], PARAMS[1], PARAMS[4]]
    firsts = [r.prefill_sample(slots, prompts, params, [1, 2, 3]).tolist() for r in (eager, graphs)]
    assert firsts[0] == firsts[1]
    assert ("prefill", 4, 16, True) in graphs._graphs  # the prefill replayed its graph (no fallback to eager)
    for step in range(12):  # 3 rows pad to the bucket of 4; a row leaves after 6 steps
        rows = slots if step < 6 else slots[:2]
        kv_len = 1 + step + max(len(p) for p in prompts)
        a = eager.decode_sample(rows, kv_len, full=True).tolist()
        b = graphs.decode_sample(rows, kv_len, full=True).tolist()
        assert a == b, f"step {step}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("multi_step_max_batch", [16, 0], ids=["one-graph", "graph-per-step"])
def test_multi_step_decode_on_graphs_gives_the_single_step_tokens_on_gpu(tiny, multi_step_max_batch):
    """The engine on CUDA graphs, 1 and its default decode steps per launch (by batch: 8 at these batches) (each step's ids copied out before the next
    replay rewrites them; the 4 steps as one graph, or one graph per step as above MULTI_STEP_GRAPH_MAX_BATCH): the
    same tokens, greedy and seeded-sampled, requests joining mid-flight."""
    results = []
    for steps in (1, None):  # None: the engine's default on graphs
        runner = TorchRunner(tiny.copy(), n_slots=4, device="cuda", cuda_graphs=True,
                             multi_step_max_batch=multi_step_max_batch)  # fmt: skip
        with Engine(runner, tiny.tokenizer, max_queue=64, decode_steps=steps) as engine:
            # the default on graphs: steps by batch (4 slots: every batch is small, DECODE_STEPS_SMALL_BATCH)
            assert engine.decode_steps == (steps or DECODE_STEPS_SMALL_BATCH) and DECODE_STEPS_SMALL_BATCH > 1
            if steps is None and multi_step_max_batch:  # captured at start, for every bucket the steps they serve
                multi = {k[1:] for k in runner._graphs if k[0] == "resident" and len(k) == 5}
                assert {(b, full, s) for b, _, full, s in multi} == {
                    (b, full, DECODE_STEPS_SMALL_BATCH) for b in (1, 2, 4) for full in (False, True)
                }
            results.append(_run(engine, tiny, CASES * 3))
    assert results[0] == results[1]


@pytest.mark.parametrize("full", [False, True])
def test_the_captured_prefill_step_equals_the_eager_prefill(tiny, full):
    """What a prefill graph records (`_prefill_step`, run here eagerly on the CPU: the capture itself is tested on
    the GPU above) leaves the tokens, the slots' sampling state and their cache rows that the eager prefill does;
    the padded rows and tokens touch the scratch slot only."""
    eager, padded = TorchRunner(tiny.model, n_slots=6), TorchRunner(tiny.model, n_slots=6)
    slots, prompts = [4, 0, 2], [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    params = [PARAMS[1], PARAMS[4], PARAMS[0]] if full else [PARAMS[0]] * 3
    seeds = [7, 8, 9]
    want = eager.prefill_sample(slots, prompts, params, seeds)
    b, T = 4, 16  # the bucket: 3 rows padded to 4, 7 tokens to 16
    padded._prefill_inputs(b, T, slots, prompts, params, seeds)
    padded._prefill_step(b, T, full)
    assert padded._pf_out[:3].tolist() == want.tolist()
    for name in ("token", "pos", "seed", "greedy", "temperature", "top_k", "top_p", "penalty", "seen"):
        got, ref = getattr(padded.state, name)[slots], getattr(eager.state, name)[slots]
        if name == "seen" and full:  # the graph marks every row's prompt; only rows with a penalty look at it
            has = torch.tensor([p.repetition_penalty != 1.0 for p in params])
            got, ref = got[has], ref[has]
        torch.testing.assert_close(got, ref, msg=name)
    for slot, prompt in zip(slots, prompts):  # the cache rows the prompts wrote; the rest of a slot is untouched
        n = len(prompt)
        torch.testing.assert_close(padded.cache.k[slot, :, :, :n], eager.cache.k[slot, :, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded.cache.v[slot, :, :, :n], eager.cache.v[slot, :, :, :n], rtol=1e-5, atol=1e-5)
        assert not padded.cache.k[slot, :, :, n:].any() and not padded.cache.v[slot, :, :, n:].any()


def test_chunked_prefill_gives_the_tokens_of_a_whole_one_and_lets_others_decode(tiny):
    class Counting(TorchRunner):
        chunks = 0

        def extend(self, slots, chunks, starts, **kw):
            self.chunks += sum(1 for a in starts if a > 0)  # a chunk after the first one of a prompt
            return super().extend(slots, chunks, starts, **kw)

    long_prompt = "whether 'tis nobler in the mind to suffer"  # 41 characters: 6 chunks of 7
    cases = [
        ("to", SamplingParams(max_new_tokens=30, temperature=0.0)),
        CASES[2],
        ("is", SamplingParams(max_new_tokens=10, temperature=0.7, seed=8)),
    ]  # prompts of a chunk or less
    long_case = (long_prompt, SamplingParams(max_new_tokens=12, temperature=0.9, repetition_penalty=1.3, seed=4))
    runner = Counting(tiny.model, n_slots=4)
    with Engine(runner, tiny.tokenizer, max_queue=64, prefill_chunk=7) as engine:
        first = engine.submit(
            make_request(*cases[0], tokenizer=tiny.tokenizer, context_len=tiny.model.config.block_size)
        )
        head = [first.next_chunk() for _ in range(3)]  # the short request is decoding when the long one comes
        ids = _run(engine, tiny, [long_case, *cases[1:]])
        rest = list(first)
    assert runner.chunks == 5  # prefilled in 6 steps: the first chunk, then 5 more at positions 7, 14, ..., 35
    assert ids[0] == generate_tokens(tiny.model, tiny.tokenizer.encode(long_prompt), long_case[1])
    for (prompt, params), got in zip(cases[1:], ids[1:]):
        assert got == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
    streamed = [t for c in head + rest for t in c.token_ids]
    assert streamed == generate_tokens(tiny.model, tiny.tokenizer.encode("to"), cases[0][1])


def test_fused_qkv_projection_equals_the_three(tiny):
    model = tiny.model
    runner = TorchRunner(model, n_slots=2)  # fuses
    idx = torch.tensor([[3, 9, 4, 1], [5, 2, 7, 7]])
    slots, zero = torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        fused = model.forward_cached(idx, runner.cache, slots, zero)
        for block in model.blocks:
            block.attn.qkv = None
        plain = model.forward_cached(idx, runner.cache, slots, zero)
        model.fuse_qkv()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert all(block.attn.qkv is not None for block in model.blocks)


def test_a_stale_fused_qkv_is_never_used(tiny):
    model = tiny.model
    TorchRunner(model, n_slots=2)  # fuses
    attn = model.blocks[0].attn
    assert attn._fused_qkv() is not None
    with torch.no_grad():
        attn.k_proj.weight.add_(0.0)  # any in-place change of a source weight
    assert attn._fused_qkv() is None
    model.fuse_qkv()
    assert attn._fused_qkv() is not None


def test_the_loop_clock_counts_what_the_resident_loop_did(tiny):
    """Engine.stats().loop: one iteration per engine step that launched work, host time split by part."""
    runner = TorchRunner(tiny.model, n_slots=2)
    params = SamplingParams(max_new_tokens=13, temperature=0.0)
    with Engine(runner, tiny.tokenizer, max_queue=8, resident=True, decode_steps=4) as engine:
        before = engine.stats().loop
        assert before.iterations == 0 and before.launch_s == before.wait_s == before.stream_s == 0.0
        _run(engine, tiny, [("to be", params)])
        after = engine.stats().loop
    # the prefill alone (token 1: the request was admitted in that step), then three 4-step launches: 13 = 1 + 3 x 4
    assert after.iterations == 4
    assert after.launch_s > 0 and after.stream_s > 0 and after.wait_s >= 0
    assert engine.stats().loop is not after  # a copy: the engine's own clock is not handed out
    with Engine(runner, tiny.tokenizer, max_queue=8, resident=False) as plain:
        assert plain.stats().loop is None
