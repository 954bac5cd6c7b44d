"""The engine against the reference generator (model.generate): continuous batching must not change a
single token, and every slot comes back whatever happens to a request."""

from __future__ import annotations

import gc
import queue
import random
import threading

import pytest

from inference_svc.detokenizer import StreamingDetokenizer
from inference_svc.engine import Chunk, DecodeSteps, Engine, FinishReason, QueueFull, RequestHandle
from inference_svc.params import make_request
from inference_svc.runner import TorchRunner, multi_step_counts
from inference_svc.sequence import Sequence
from model.generate import generate, generate_tokens
from model.field_checks import FieldError
from model.sampling import SamplingParams
from inference_svc.testing import engine_idle, wait_until

PROMPTS = [
    "to be",
    "or not to be: that",
    "t",
    "whether 'tis nobler in the",
    "the question. ",
    "suffer!",
    "is",
    "mind to",
]
PARAMS = [
    SamplingParams(max_new_tokens=12, temperature=0.0),
    SamplingParams(max_new_tokens=30, temperature=0.8, top_k=5, seed=1),
    SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=2),
    SamplingParams(max_new_tokens=25, temperature=0.0, repetition_penalty=1.5),
    SamplingParams(max_new_tokens=18, temperature=1.2, top_k=8, top_p=0.8, repetition_penalty=1.3, seed=3),
    SamplingParams(max_new_tokens=40, temperature=0.7, seed=4),
    SamplingParams(max_new_tokens=3, temperature=0.0),
    SamplingParams(max_new_tokens=22, temperature=1.0, seed=5),
]


# Decode steps per engine step: 1 (one launch, one token per row) and 3 (multi-step: each row's tokens of an engine
# step stream as one chunk; stop strings, lengths and cancels must land on the same tokens).
DECODE_STEPS = [1, 3]


@pytest.fixture(params=DECODE_STEPS, ids=lambda k: f"decode_steps={k}")
def engine(tiny, request):
    runner = TorchRunner(tiny.model, n_slots=4)
    with Engine(runner, tiny.tokenizer, max_queue=2000, decode_steps=request.param) as eng:
        yield eng


def _request(tiny, prompt, params, **kw):
    return make_request(prompt, params, tokenizer=tiny.tokenizer, context_len=tiny.model.config.block_size, **kw)


def _collect(handle):
    chunks = list(handle)
    assert sum(c.final for c in chunks) == 1 and chunks[-1].final
    return chunks


def test_concurrent_requests_admitted_at_different_times_match_the_reference(tiny, engine):
    cases = list(zip(PROMPTS, PARAMS)) * 2  # 16 requests for 4 slots: most wait, then join mid-flight
    handles = [engine.submit(_request(tiny, p, s)) for p, s in cases[:3]]
    early = [handles[1].next_chunk() for _ in range(3)]  # request 1 is decoding when the next ones arrive
    handles += [engine.submit(_request(tiny, p, s)) for p, s in cases[3:9]]
    early += [handles[5].next_chunk()]
    handles += [engine.submit(_request(tiny, p, s)) for p, s in cases[9:]]

    for i, ((prompt, params), handle) in enumerate(zip(cases, handles)):
        chunks = ([c for c in early[:3]] if i == 1 else [early[3]] if i == 5 else []) + _collect(handle)
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params), f"request {i}"
        assert "".join(c.text for c in chunks) == generate(tiny.model, tiny.tokenizer, prompt, params)
        final = chunks[-1]
        assert final.finish_reason is FinishReason.LENGTH and final.error == ""
        assert final.usage.prompt_tokens == len(prompt) and final.usage.completion_tokens == params.max_new_tokens
        # one token per chunk, the last one on the final; with multi-step decode a chunk holds a row's run
        assert all(1 <= len(c.token_ids) <= engine.decode_steps for c in chunks[:-1]) and len(final.token_ids) == 1
        t = final.timings
        assert len(t.token_ms) == params.max_new_tokens and list(t.token_ms) == sorted(t.token_ms)
        assert t.queue_ms <= t.ttft_ms == t.token_ms[0] <= t.total_ms
    assert engine.stats().free_slots == 4


def test_stop_sequences_end_the_stream_without_showing_the_stop(tiny, engine):
    prompt = "to be"
    full = generate(tiny.model, tiny.tokenizer, prompt, SamplingParams(max_new_tokens=40, temperature=0.0))
    stop = full[12:15]
    cut = full.find(stop)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop=("never-there", stop))
    chunks = _collect(engine.submit(_request(tiny, prompt, params)))
    text = "".join(c.text for c in chunks)
    assert text == full[:cut] == generate(tiny.model, tiny.tokenizer, prompt, params)
    assert chunks[-1].finish_reason is FinishReason.STOP
    # Character tokens: generation ends at the token that completes the stop string.
    assert chunks[-1].usage.completion_tokens == cut + len(stop)
    assert all(c.text == "" for c in chunks[cut:])  # the stop's own tokens show nothing

    unmatched = SamplingParams(max_new_tokens=40, temperature=0.0, stop=("never-there",))
    chunks = _collect(engine.submit(_request(tiny, prompt, unmatched)))
    assert "".join(c.text for c in chunks) == full and chunks[-1].finish_reason is FinishReason.LENGTH


def test_context_length_ends_with_length(tiny, engine):
    block = tiny.model.config.block_size
    prompt = (PROMPTS[3] * 10)[: block - 3]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    chunks = _collect(engine.submit(_request(tiny, prompt, params)))
    ids = [t for c in chunks for t in c.token_ids]
    # Prompt positions 0..block-4, then 3 fed-back tokens fill the cache: 4 tokens in all.
    assert len(ids) == 4 and chunks[-1].finish_reason is FinishReason.LENGTH
    assert ids == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)[:4]
    full = _collect(engine.submit(_request(tiny, (PROMPTS[1] * 20)[:block], params)))
    assert full[-1].usage.completion_tokens == 1 and full[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("decode_steps", DECODE_STEPS)
def test_cancel_frees_the_slot_by_the_next_step(tiny, decode_steps):
    with Engine(TorchRunner(tiny.model, n_slots=1), tiny.tokenizer, max_queue=4, decode_steps=decode_steps) as engine:
        running = engine.submit(_request(tiny, "to be", SamplingParams(max_new_tokens=120, temperature=0.0)))
        first = running.next_chunk()
        waiting = engine.submit(_request(tiny, "or not", SamplingParams(max_new_tokens=5), request_id="w"))
        assert not first.final and engine.stats().queued == 1
        assert engine.cancel("w") and running.cancel()
        for handle in (running, waiting):
            final = _collect(handle)[-1]
            assert final.finish_reason is FinishReason.CANCELLED
        assert final.usage.completion_tokens == 0
        # The slot was back before the final chunk was sent.
        stats = engine.stats()
        assert (stats.free_slots, stats.queued, stats.running, stats.in_flight) == (1, 0, 0, 0)
        assert not engine.cancel("w")  # finished requests are not in flight any more


def test_full_queue_and_duplicate_ids_are_refused(tiny):
    with Engine(TorchRunner(tiny.model, n_slots=1), tiny.tokenizer, max_queue=2) as engine:
        long = SamplingParams(max_new_tokens=120, temperature=0.0)
        running = engine.submit(_request(tiny, "to be", long, request_id="a"))
        running.next_chunk()
        queued = [engine.submit(_request(tiny, "or", long, request_id=rid)) for rid in ("b", "c")]
        with pytest.raises(QueueFull, match="full"):
            engine.submit(_request(tiny, "or", long))
        with pytest.raises(ValueError, match="'a' is already in flight"):
            engine.submit(_request(tiny, "or", long, request_id="a"))
        for handle in (running, *queued):
            handle.cancel()
            assert _collect(handle)[-1].finish_reason is FinishReason.CANCELLED
        assert engine.stats().free_slots == 1


def test_submit_many_is_all_or_none_and_admits_together(tiny):
    with Engine(TorchRunner(tiny.model, n_slots=2), tiny.tokenizer, max_queue=1) as engine:
        long = SamplingParams(max_new_tokens=120, temperature=0.0)
        with pytest.raises(QueueFull, match="4 requests do not fit: 2 free slots, 0 of 1 queue places"):
            engine.submit_many([_request(tiny, "or", long) for _ in range(4)])
        with pytest.raises(ValueError, match="'x' appears more than once"):
            engine.submit_many([_request(tiny, "or", long, request_id=rid) for rid in ("w", "x", "x")])
        stats = engine.stats()  # nothing of the refused batches was kept
        assert (stats.free_slots, stats.queued, stats.running, stats.in_flight) == (2, 0, 0, 0)
        cases = list(zip(PROMPTS, PARAMS))[:3]
        handles = engine.submit_many([_request(tiny, p, s) for p, s in cases])  # 3 for 2 slots + 1 queue place
        finals = [h.result() for h in handles]
        for (prompt, params), final in zip(cases, finals):
            assert list(final.token_ids) == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
        # One arrival for the batch: the first two were admitted by the same step, so their queue times are equal.
        assert finals[0].timings.queue_ms == finals[1].timings.queue_ms < finals[2].timings.queue_ms
        assert engine.stats().free_slots == 2


def test_a_token_chunk_leaves_the_collectors_view(tiny, engine):
    """The engine queues a token's chunk as a plain tuple that the collector untracks (a NamedTuple stays tracked
    and ages into full collections), and the handle still hands out a Chunk."""
    seq = Sequence(request=_request(tiny, "to be", PARAMS[0]), detokenizer=StreamingDetokenizer(tiny.tokenizer),
                   generator=None, sink=queue.SimpleQueue())  # fmt: skip
    engine._append(seq, tiny.tokenizer.encode("o")[0], 0.0)
    item = seq.sink.get_nowait()
    for _ in range(2):  # the first untracks (token,), the next the tuple around it: young collections do the same
        gc.collect()
    assert type(item) is tuple and not gc.is_tracked(item)
    handle = RequestHandle(engine, seq.request_id, seq.sink)
    seq.sink.put(item)
    chunk = handle.next_chunk(0)
    assert isinstance(chunk, Chunk) and chunk.token_ids == tuple(tiny.tokenizer.encode("o")) and not chunk.final


def test_close_cancels_what_is_in_flight(tiny):
    engine = Engine(TorchRunner(tiny.model, n_slots=2), tiny.tokenizer)
    handle = engine.submit(_request(tiny, "to be", SamplingParams(max_new_tokens=120, temperature=0.0)))
    handle.next_chunk()
    engine.close()
    final = _collect(handle)[-1]
    assert final.finish_reason is FinishReason.CANCELLED and "shut down" in final.error
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(_request(tiny, "to be", SamplingParams(max_new_tokens=1)))


@pytest.mark.parametrize("decode_steps", DECODE_STEPS)
def test_a_thousand_requests_with_random_cancellations_leak_nothing(tiny, decode_steps):
    rng = random.Random(7)
    engine = Engine(TorchRunner(tiny.model, n_slots=8), tiny.tokenizer, max_queue=1000, decode_steps=decode_steps)
    with engine:
        handles, cancel_at = [], {}
        for i in range(1000):
            params = SamplingParams(
                max_new_tokens=rng.randint(1, 6),
                temperature=rng.choice([0.0, 1.0]),
                seed=rng.choice([None, i]),
                stop=rng.choice([(), ("e",)]),
            )
            handles.append(engine.submit(_request(tiny, rng.choice(PROMPTS), params)))
            roll = rng.random()
            if roll < 0.15:
                handles[-1].cancel()  # most likely still waiting
            elif roll < 0.3:
                cancel_at[i] = True  # cancelled once it has streamed something
        reasons = []
        for i, handle in enumerate(handles):
            first = handle.next_chunk()
            if cancel_at.get(i) and not first.final:
                handle.cancel()
            chunks = [first, *_collect(handle)] if not first.final else [first]
            reasons.append(chunks[-1].finish_reason)
            assert sum(c.final for c in chunks) == 1
        assert set(reasons) <= {FinishReason.LENGTH, FinishReason.STOP, FinishReason.CANCELLED}
        assert reasons.count(FinishReason.CANCELLED) >= 100
        stats = engine.stats()
        assert (stats.free_slots, stats.queued, stats.running, stats.in_flight) == (8, 0, 0, 0)
        assert engine.scheduler.pool.n_used == 0
    del handles, first, chunks
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Sequence]


def test_multi_step_decode_streams_each_rows_tokens_together(tiny):
    """decode_steps=4: a row's tokens of one engine step come as one chunk, a request ends exactly at its
    max_new_tokens (a step never launches past the row with the fewest tokens left), and the tokens are the
    reference's."""
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (13, 6)]
    with Engine(TorchRunner(tiny.model, n_slots=2), tiny.tokenizer, decode_steps=4) as engine:
        handles = [engine.submit(_request(tiny, p, s)) for p, s in zip(PROMPTS, params)]
        chunks = [_collect(h) for h in handles]
    for prompt, param, got in zip(PROMPTS, params, chunks):
        ids = [t for c in got for t in c.token_ids]
        assert ids == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), param)
        assert got[-1].finish_reason is FinishReason.LENGTH and got[-1].usage.completion_tokens == param.max_new_tokens
        assert max(len(c.token_ids) for c in got) > 1  # some chunk carried a multi-step run
        assert "".join(c.text for c in got) == tiny.tokenizer.decode(ids)


def test_a_failed_multi_step_launch_is_retried_row_by_row(tiny):
    class FailsOnce(TorchRunner):
        calls = 0

        def decode_sample(self, slots, kv_len, full, steps=1):
            self.calls += 1
            if self.calls == 1:  # the first decode launch (2 rows x 4 steps), before any work
                raise RuntimeError("injected")
            return super().decode_sample(slots, kv_len, full, steps)

    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    runner = FailsOnce(tiny.model, n_slots=2)
    with Engine(runner, tiny.tokenizer, decode_steps=4) as engine:
        finals = [h.result() for h in engine.submit_many([_request(tiny, p, params) for p in PROMPTS[:2]])]
    for prompt, final in zip(PROMPTS, finals):
        assert final.finish_reason is FinishReason.LENGTH
        assert list(final.token_ids) == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
    assert runner.calls > 3


class _Gated(TorchRunner):
    """Records each decode launch (its rows and steps, and how many chunks the watched handle's queue held then);
    the `hold`-th launch waits for `gate`, so the test can submit a request while a known step is on the runner."""

    def __init__(self, *args, hold: int = 0, **kw) -> None:
        super().__init__(*args, **kw)
        self.hold, self.gate, self.launches = hold, threading.Event(), []
        self.watch: RequestHandle | None = None

    def decode_sample(self, slots, kv_len, full, steps=1):
        queued = None if self.watch is None else self.watch._sink.qsize()  # the engine thread: nobody reads it yet
        self.launches.append((len(slots), steps, queued))
        if len(self.launches) == self.hold:
            assert self.gate.wait(20), "the test never opened the gate"
        return super().decode_sample(slots, kv_len, full, steps)


@pytest.mark.parametrize("decode_steps", DECODE_STEPS)
def test_a_first_token_is_streamed_before_the_next_launch(tiny, decode_steps):
    """A request admitted while another decodes: the first token its prefill sampled reaches its stream in the engine
    step of its prefill (while that step's decode steps run), alone, before the next step launches; its later tokens
    follow in order, and every token is the reference's."""
    runner = _Gated(tiny.model, n_slots=2, hold=2)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    with Engine(runner, tiny.tokenizer, decode_steps=decode_steps) as engine:
        running = engine.submit(_request(tiny, PROMPTS[0], params))
        assert wait_until(lambda: len(runner.launches) == 2)  # the running request's 2nd decode launch, held
        runner.watch = joining = engine.submit(_request(tiny, PROMPTS[1], params))
        runner.gate.set()  # the next step prefills the joining request and decodes the running one
        assert wait_until(lambda: engine_idle(engine))
        chunks = [_collect(h) for h in (running, joining)]
    both = [queued for rows, _, queued in runner.launches if rows == 2]
    assert both and both[0] == 1, runner.launches  # its first chunk was there when its first decode launched
    first = chunks[1][0]
    assert len(first.token_ids) == 1 and not first.final
    for prompt, got in zip(PROMPTS, chunks):
        ids = [t for c in got for t in c.token_ids]
        assert ids == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
        assert "".join(c.text for c in got) == tiny.tokenizer.decode(ids)
        token_ms = got[-1].timings.token_ms
        assert list(token_ms) == sorted(token_ms) and len(token_ms) == len(ids)


def test_decode_steps_by_batch():
    steps = DecodeSteps(small=8, large=4, small_max_batch=16)
    assert [steps(b) for b in (1, 16, 17, 256)] == [8, 8, 4, 4] and steps.most == 8
    assert DecodeSteps() == steps  # the engine's default on CUDA graphs
    fixed = DecodeSteps.fixed(3)
    assert {fixed(b) for b in (1, 16, 17, 256)} == {3} and fixed.most == 3
    for bad in (dict(small=0), dict(large=65), dict(small_max_batch=-1), dict(small=2.5)):
        with pytest.raises(FieldError, match="decode_steps"):
            DecodeSteps(**bad)
    with pytest.raises(FieldError, match="decode_steps"):
        DecodeSteps.fixed(0)


def test_multi_step_graphs_are_planned_for_every_step_count_a_bucket_serves():
    assert multi_step_counts(20, DecodeSteps()) == {1: [8], 2: [8], 4: [8], 8: [8], 16: [8], 20: [4]}
    # a threshold inside a bucket (13..16 -> bucket 16): that bucket gets both counts
    assert multi_step_counts(16, DecodeSteps(small_max_batch=12))[16] == [4, 8]
    assert multi_step_counts(4, 3) == {1: [3], 2: [3], 4: [3]} and multi_step_counts(4, 1) == {1: [], 2: [], 4: []}
    with pytest.raises(ValueError, match="steps must be 1..64"):
        multi_step_counts(4, lambda batch: 65)


def test_the_engine_launches_the_steps_of_its_running_batch_and_the_tokens_are_the_references(tiny):
    """decode_steps by batch (5 steps up to 2 rows, 2 above): each launch takes its batch's steps (fewer only for a
    row near its end), and every request gets the tokens of one-step decoding."""
    runner = _Gated(tiny.model, n_slots=4)
    policy = DecodeSteps(small=5, large=2, small_max_batch=2)
    cases = list(zip(PROMPTS, PARAMS))
    with Engine(runner, tiny.tokenizer, max_queue=64, decode_steps=policy) as engine:
        assert engine.steps_for is policy and engine.decode_steps == 5
        finals = [h.result() for h in engine.submit_many([_request(tiny, p, s) for p, s in cases])]
    for (prompt, params), final in zip(cases, finals):
        assert list(final.token_ids) == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
    assert all(steps <= policy(rows) for rows, steps, _ in runner.launches)
    used = {(rows <= 2, steps) for rows, steps, _ in runner.launches}
    assert (True, 5) in used and (False, 2) in used, runner.launches


def test_decode_steps_default_to_one_without_cuda_graphs(tiny):
    with Engine(TorchRunner(tiny.model, n_slots=2), tiny.tokenizer) as engine:
        assert engine.decode_steps == 1 and {engine.steps_for(b) for b in (1, 2)} == {1}
