"""EngineProcess: the engine in a spawned child (real processes, real pipes, real gRPC on loopback) gives the same
tokens, chunks, refusals and slot accounting as the in-process Engine, ends its child on close, and a killed child
ends every open request with an error instead of a hang."""

from __future__ import annotations

import functools
import os
import signal
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from inference_svc.engine import Engine, FinishReason, QueueFull
from inference_svc.engine_test import PARAMS, PROMPTS, _collect, _request
from inference_svc.engine_process import EngineProcess
from inference_svc.main import SERVERS, start_grpc
from inference_svc.params import make_request
from inference_svc.runner import TorchRunner
from inference_svc.scheduler import DuplicateRequest
from inference_svc.service import ServedModel
from inference_svc.service_test import _wire
from inference_svc.testing import engine_idle, wait_until
from model.artifact import load_artifact
from model.generate import generate
from model.sampling import SamplingParams
from protos import inference_pb2, inference_pb2_grpc
from rpc.client import channel

CASES = list(zip(PROMPTS, PARAMS))[:6]  # greedy, seeded top-k / top-p, repetition penalty
LONG = SamplingParams(max_new_tokens=120, temperature=0.0)


def tiny_engine(path: str, max_slots: int, max_queue: int = 64, decode_steps: int | None = None) -> Engine:
    """The engine the child builds: the tiny artifact at `path` on a CPU TorchRunner."""
    artifact = load_artifact(path)
    runner = TorchRunner(artifact.model, n_slots=max_slots)
    return Engine(runner, artifact.tokenizer, max_queue=max_queue, decode_steps=decode_steps)


def _spawn(tiny, max_slots: int, max_queue: int = 64, decode_steps: int | None = None) -> EngineProcess:
    return EngineProcess(functools.partial(tiny_engine, str(tiny.path), max_slots, max_queue, decode_steps))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def proc(tiny):
    """One engine process (4 slots, 3 decode steps an engine step: multi-token chunks) for the tests that leave it
    idle."""
    with _spawn(tiny, 4, decode_steps=3) as p:
        yield p


def test_tokens_and_chunks_equal_the_in_process_engines(tiny, proc):
    """Greedy, seeded sampling, repetition penalty, a stop string: every request's chunks (token ids, texts, finish
    fields) equal the in-process engine's, batched the same way (3 decode steps an engine step), in order."""
    with Engine(TorchRunner(tiny.model, n_slots=4), tiny.tokenizer, max_queue=64, decode_steps=3) as local:
        for engine in (local, proc):
            assert engine.max_slots == 4 and engine.runner.max_len == tiny.model.config.block_size
        greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
        stop = generate(tiny.model, tiny.tokenizer, "mind", greedy)[12:15]  # met after 12 characters
        cases = [*CASES, ("mind", replace(greedy, stop=("never-there", stop)))]
        requests = [_request(tiny, p, s, request_id=f"r{i}") for i, (p, s) in enumerate(cases)]
        want = [_collect(h) for h in local.submit_many(requests)]
        got = [_collect(h) for h in proc.submit_many(requests)]
    assert any(w[-1].finish_reason is FinishReason.STOP for w in want)
    for w, g in zip(want, got):
        assert [(c.request_id, c.token_ids, c.text, c.finish_reason, c.error) for c in g] == [
            (c.request_id, c.token_ids, c.text, c.finish_reason, c.error) for c in w
        ]
        assert g[-1].usage == w[-1].usage
        t = g[-1].timings
        assert len(t.token_ms) == g[-1].usage.completion_tokens and t.queue_ms <= t.ttft_ms <= t.total_ms
    assert wait_until(lambda: engine_idle(proc))
    assert proc.stats().finished["stop"] == 1


def test_cancel_frees_the_slot_and_refusals_raise_the_engines_types(tiny):
    """One slot, two queue places: QueueFull, a duplicate id, a prompt beyond the context and a closed engine raise
    what Engine raises, and harm no other request; cancelling a running and a queued request ends both CANCELLED
    and gives the slot back."""
    proc = _spawn(tiny, 1, max_queue=2)
    try:
        running = proc.submit(_request(tiny, "to be", LONG, request_id="a"))
        first = running.next_chunk(timeout=60)
        assert first is not None and not first.final
        queued = proc.submit_many([_request(tiny, "or", LONG, request_id=rid) for rid in ("b", "c")])
        with pytest.raises(QueueFull, match="full"):
            proc.submit(_request(tiny, "or", LONG))
        with pytest.raises(DuplicateRequest, match="'a' is already in flight"):
            proc.submit(_request(tiny, "or", LONG, request_id="a"))
        with pytest.raises(DuplicateRequest, match="'x' appears more than once") as dup:
            proc.submit_many([_request(tiny, "or", LONG, request_id=rid) for rid in ("w", "x", "x")])
        assert dup.value.index == 2
        with pytest.raises(ValueError, match="exceed the context length"):
            proc.submit(make_request("t" * 500, LONG, tokenizer=tiny.tokenizer, context_len=10_000))
        stats = proc.stats()
        assert (stats.free_slots, stats.queued, stats.running, stats.in_flight) == (0, 2, 1, 3)
        assert proc.cancel("c") and running.cancel()
        for handle in (running, queued[1]):
            assert _collect(handle)[-1].finish_reason is FinishReason.CANCELLED
        # The refused ones took nothing: "b" gets the slot and runs to its end, the reference's tokens.
        b = queued[0].result()
        reference = Engine(TorchRunner(tiny.model, n_slots=1), tiny.tokenizer)
        try:
            assert b.token_ids == reference.submit(_request(tiny, "or", LONG)).result().token_ids
        finally:
            reference.close()
        assert wait_until(lambda: engine_idle(proc))
        assert proc.stats().finished == {"length": 1, "stop": 0, "cancelled": 2, "error": 0}
        assert not proc.cancel("c")  # ended: not in flight any more
    finally:
        pid = proc.pid
        proc.close()
    assert not _alive(pid)
    with pytest.raises(RuntimeError, match="closed"):
        proc.submit(_request(tiny, "to be", LONG))


def test_close_cancels_what_is_in_flight_and_leaves_no_child(tiny):
    proc = _spawn(tiny, 2)
    handle = proc.submit(_request(tiny, "to be", LONG))
    assert handle.next_chunk(timeout=60) is not None
    pid = proc.pid
    proc.close()
    final = _collect(handle)[-1]
    assert final.finish_reason is FinishReason.CANCELLED and "shut down" in final.error
    assert not _alive(pid)
    proc.close()  # twice: a no-op


def test_a_killed_child_ends_every_open_request_with_an_error(tiny):
    proc = _spawn(tiny, 2, max_queue=4)
    try:
        handles = proc.submit_many([_request(tiny, p, LONG) for p in ("to be", "or not", "t")])  # 2 run, 1 waits
        assert handles[0].next_chunk(timeout=60) is not None
        os.kill(proc.pid, signal.SIGKILL)
        for handle in handles:
            final = _collect(handle)[-1]
            assert final.finish_reason is FinishReason.ERROR and f"exit code {-signal.SIGKILL}" in final.error
        with pytest.raises(RuntimeError, match="the engine process exited"):
            proc.submit(_request(tiny, "to be", LONG))
        assert proc.stats().in_flight == 0
    finally:
        proc.close()


def test_an_engine_that_cannot_be_built_raises_its_error_here(tiny):
    with pytest.raises(ValueError, match="max_slots"):
        EngineProcess(functools.partial(_engine_with_too_many_slots, str(tiny.path)))


def _engine_with_too_many_slots(path: str) -> Engine:
    artifact = load_artifact(path)
    return Engine(TorchRunner(artifact.model, n_slots=2), artifact.tokenizer, max_slots=3)


@pytest.mark.parametrize("server", SERVERS)
def test_grpc_streams_over_the_engine_process_and_a_cancelled_call_frees_its_slot(tiny, proc, server):
    """The server `./tinylm serve --engine-process` builds (start_grpc over the EngineProcess): concurrent streams equal
    the in-process engine's tokens with their final fields; a call the client cancels ends its request CANCELLED in
    the child, and every slot comes back."""
    model = ServedModel(id=tiny.model_id, name="tiny-test", path=tiny.path, manifest=load_artifact(tiny.path).manifest)
    with Engine(TorchRunner(tiny.model, n_slots=4), tiny.tokenizer) as local:
        want = [local.submit(_request(tiny, p, s)).result() for p, s in CASES]
    before = proc.stats().finished
    running = start_grpc(proc, model, server=server)
    try:
        with channel(running.address) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)

            def one(i):
                prompt, p = CASES[i]
                wire = _wire(p)
                return list(stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, params=wire), timeout=60))

            with ThreadPoolExecutor(len(CASES)) as pool:
                streams = list(pool.map(one, range(len(CASES))))
            for responses, w in zip(streams, want):
                assert [t for r in responses for t in r.token_ids] == list(w.token_ids)
                assert "".join(r.text for r in responses) == w.text
                final = responses[-1]
                assert final.finish_reason == {FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
                                               FinishReason.STOP: inference_pb2.FINISH_REASON_STOP}[w.finish_reason]  # fmt: skip
                assert final.usage.completion_tokens == w.usage.completion_tokens

            call = stub.Generate(inference_pb2.GenerateRequest(prompt="to be", params=inference_pb2.SamplingParameters(
                max_new_tokens=120, temperature=0.0, has_temperature=True)), timeout=60)  # fmt: skip
            assert len(next(call).token_ids) == 1
            call.cancel()
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.CANCELLED
            assert wait_until(lambda: engine_idle(proc))
            assert proc.stats().finished["cancelled"] == before["cancelled"] + 1
    finally:
        running.stop(0)
