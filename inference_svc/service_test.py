"""InferenceService over real gRPC on loopback: streams equal the reference generator, errors follow the
house conventions, and a caller that cancels, disconnects or runs out of time gives its slot back."""

from __future__ import annotations

import asyncio
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference_svc.engine import Chunk, Engine, FinishReason
from inference_svc import service
from inference_svc.main import SERVERS, start_grpc
from inference_svc.runner import TorchRunner
from inference_svc.service import SERVICE_NAME, InferenceService, ServedModel, _merged, _StreamPump
from inference_svc.testing import engine_idle, wait_until
from model.artifact import load_artifact
from model.generate import generate, generate_tokens
from model.sampling import SamplingParams
from protos import common_pb2, inference_pb2, inference_pb2_grpc
from rpc.client import channel

LONG = inference_pb2.SamplingParameters(max_new_tokens=120, temperature=0.0, has_temperature=True)
SHORT = inference_pb2.SamplingParameters(max_new_tokens=3)


@pytest.fixture(params=SERVERS)
def start(tiny, request):
    """start(max_slots, max_queue) -> (stub, engine, channel); everything is stopped at teardown. Every test runs
    against both server constructions of `./tinylm serve` (aio: AsyncInferenceService; threads: InferenceService)."""
    opened = []

    def _start(max_slots: int = 4, max_queue: int = 64, **service_kw):
        engine = Engine(TorchRunner(tiny.model, n_slots=max_slots), tiny.tokenizer, max_queue=max_queue)
        manifest = load_artifact(tiny.path).manifest
        model = ServedModel(id=tiny.model_id, name="tiny-test", path=tiny.path, manifest=manifest)
        running = start_grpc(engine, model, server=request.param, **service_kw)
        ch = channel(running.address)
        opened.append((ch, running, engine))
        return inference_pb2_grpc.InferenceServiceStub(ch), engine, ch

    yield _start
    for ch, running, engine in opened:
        ch.close()
        running.stop(0)
        engine.close()


def _cancelled_not_finished(engine, n: int = 1) -> bool:
    """The slot came back because the request was cancelled, not because it ran to its end."""
    finished = engine.stats().finished
    return finished["cancelled"] == n and finished["length"] == finished["stop"] == finished["error"] == 0


def _wire(p: SamplingParams) -> inference_pb2.SamplingParameters:
    return inference_pb2.SamplingParameters(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        has_temperature=True,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed or 0,
        has_seed=p.seed is not None,
        stop=list(p.stop),
    )


CASES = [
    ("to be", SamplingParams(max_new_tokens=20, temperature=0.0)),
    ("or not to be: that", SamplingParams(max_new_tokens=35, temperature=0.9, top_k=6, seed=11)),
    ("t", SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.85, repetition_penalty=1.2, seed=12)),
    ("whether 'tis", SamplingParams(max_new_tokens=28, temperature=0.0, repetition_penalty=1.4)),
    ("the question", SamplingParams(max_new_tokens=16, temperature=0.6, seed=13)),
    ("suffer", SamplingParams(max_new_tokens=40, temperature=1.0, seed=14)),
]


def test_concurrent_streams_equal_the_reference(tiny, start):
    stub, engine, _ = start(max_slots=3)

    def one(i):
        prompt, params = CASES[i % len(CASES)]
        time.sleep(0.005 * i)  # arrivals spread over the first steps
        req = inference_pb2.GenerateRequest(prompt=prompt, params=_wire(params), request_id=f"r{i}")
        return list(stub.Generate(req, timeout=60))

    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(one, range(12)))
    for i, responses in enumerate(streams):
        prompt, params = CASES[i % len(CASES)]
        assert all(r.request_id == f"r{i}" for r in responses)
        ids = [t for r in responses for t in r.token_ids]
        assert ids == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
        assert "".join(r.text for r in responses) == generate(tiny.model, tiny.tokenizer, prompt, params)
        final = responses[-1]
        assert [r.finish_reason for r in responses[:-1]] == [inference_pb2.FINISH_REASON_UNSPECIFIED] * (
            len(responses) - 1
        )
        assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH and final.error == ""
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), params.max_new_tokens)
        assert final.timings.ttft_ms <= final.timings.total_ms
    assert engine_idle(engine)


@pytest.mark.parametrize("messages_per_s", [float("inf"), 20.0])
def test_stream_messages_gather_tokens_under_the_servers_budget(tiny, start, messages_per_s):
    """A stream's messages after the first are at least (open streams / the budget) apart: the tokens made
    meanwhile come as one message (the same ids and text as the reference); the first token is never held; an
    unlimited budget sends tokens as they come."""
    stub, engine, _ = start(messages_per_s=messages_per_s)
    prompt, params = CASES[5]  # 40 tokens
    responses = list(stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, params=_wire(params)), timeout=60))
    ids = [t for r in responses for t in r.token_ids]
    assert ids == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
    assert "".join(r.text for r in responses) == generate(tiny.model, tiny.tokenizer, prompt, params)
    assert len(responses[0].token_ids) == 1  # the first token went out alone
    if messages_per_s < 100:  # one stream: 50 ms apart; 40 tokens at a few ms each on this CPU model
        assert len(responses) < len(ids) / 2
    with pytest.raises(ValueError, match="messages_per_s must be > 0"):
        InferenceService(engine, None, messages_per_s=0)
    assert engine_idle(engine)


def test_stop_sequence_and_defaults_over_the_wire(tiny, start):
    stub, _, _ = start()
    full = generate(tiny.model, tiny.tokenizer, "to be", SamplingParams(max_new_tokens=30, temperature=0.0))
    stop = full[8:10]
    params = inference_pb2.SamplingParameters(max_new_tokens=30, has_temperature=True, stop=[stop])
    responses = list(stub.Generate(inference_pb2.GenerateRequest(prompt="to be", params=params), timeout=30))
    assert "".join(r.text for r in responses) == full[: full.find(stop)]
    assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert len(responses[-1].request_id) == 32  # made by the server
    # No params at all: temperature 1, max_new_tokens 64 (within the context of 128).
    responses = list(stub.Generate(inference_pb2.GenerateRequest(prompt="to be"), timeout=30))
    assert responses[-1].usage.completion_tokens == 64


def test_generate_batch_answers_in_request_order(tiny, start):
    stub, engine, _ = start(max_slots=2)
    reqs = [
        inference_pb2.GenerateRequest(prompt=p, params=_wire(s), request_id=f"b{i}") for i, (p, s) in enumerate(CASES)
    ]
    reply = stub.GenerateBatch(inference_pb2.GenerateBatchRequest(requests=reqs), timeout=60)
    assert [r.request_id for r in reply.results] == [f"b{i}" for i in range(len(CASES))]
    for result, (prompt, params) in zip(reply.results, CASES):
        assert list(result.token_ids) == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
        assert result.text == generate(tiny.model, tiny.tokenizer, prompt, params)
        assert result.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert engine_idle(engine)


@pytest.mark.parametrize(
    "request_kw, field",
    [
        (dict(prompt="to be", params=inference_pb2.SamplingParameters(top_p=1.5)), "params.top_p"),
        (
            dict(prompt="to be", params=inference_pb2.SamplingParameters(temperature=-1, has_temperature=True)),
            "params.temperature",
        ),
        (dict(prompt="to be", params=inference_pb2.SamplingParameters(max_new_tokens=129)), "params.max_new_tokens"),
        (dict(prompt="to be", params=inference_pb2.SamplingParameters(stop=list("abcdefghi"))), "params.stop"),
        (dict(prompt="to be", params=inference_pb2.SamplingParameters(top_k=-1)), "params.top_k"),
        (
            dict(prompt="to be", params=inference_pb2.SamplingParameters(repetition_penalty=-2)),
            "params.repetition_penalty",
        ),
        (dict(prompt=""), "prompt"),
        (dict(prompt="ZZZ"), "prompt"),
        (dict(prompt="to be " * 30), "prompt"),
        (dict(prompt="to be", truncation=7), "truncation"),
        (dict(prompt="to be", model=common_pb2.ModelRef(id="abc")), "model.id"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(start, request_kw, field):
    stub, _, _ = start()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(inference_pb2.GenerateRequest(**request_kw), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_batch_errors_name_the_request_and_unknown_models_are_not_found(tiny, start):
    stub, engine, _ = start()
    good = inference_pb2.GenerateRequest(prompt="to be")
    bad = inference_pb2.GenerateRequest(prompt="to be", params=inference_pb2.SamplingParameters(seed=-1, has_seed=True))
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateBatch(inference_pb2.GenerateBatchRequest(requests=[good, bad]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(
        "requests[1].params.seed:"
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateBatch(inference_pb2.GenerateBatchRequest(), timeout=10)
    assert err.value.details().startswith("requests:")
    twins = [inference_pb2.GenerateRequest(prompt="to be", request_id="same")] * 2
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateBatch(inference_pb2.GenerateBatchRequest(requests=twins), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(
        "requests[1].request_id:"
    )
    for ref in (common_pb2.ModelRef(id="ffffffffff"), common_pb2.ModelRef(name="other")):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(inference_pb2.GenerateRequest(prompt="to be", model=ref), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and tiny.model_id in err.value.details()
    for ref in (
        common_pb2.ModelRef(id=tiny.model_id[:8]),
        common_pb2.ModelRef(id="tiny-test"),
        common_pb2.ModelRef(name="tiny-test"),
    ):
        ok = list(stub.Generate(inference_pb2.GenerateRequest(prompt="to", model=ref, params=SHORT), timeout=30))
        assert ok[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert engine_idle(engine)


def test_list_models_tokenize_and_health(tiny, start):
    stub, _, ch = start()
    (info,) = stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
    assert (info.id, info.name, info.preset) == (tiny.model_id, "tiny-test", "tiny")
    assert info.n_params == tiny.model.num_params() and info.metrics["val_loss"] == 3.5
    assert info.path == str(tiny.path.resolve()) and info.created_unix > 0 and list(info.formats) == []
    assert not stub.ListModels(common_pb2.ListModelsRequest(name_prefix="nope"), timeout=10).models
    reply = stub.Tokenize(inference_pb2.TokenizeRequest(text="to be"), timeout=10)
    assert list(reply.token_ids) == tiny.tokenizer.encode("to be") and list(reply.pieces) == list("to be")
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(inference_pb2.TokenizeRequest(text="Q"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("text:")
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_client_cancel_frees_the_slot(start):
    stub, engine, _ = start(max_slots=1)
    call = stub.Generate(inference_pb2.GenerateRequest(prompt="to be", params=LONG), timeout=30)
    first = next(call)
    assert first.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED and engine.stats().running == 1
    call.cancel()
    assert wait_until(lambda: engine_idle(engine))
    assert _cancelled_not_finished(engine)


def test_client_disconnect_frees_the_slot(start):
    stub, engine, ch = start(max_slots=1)
    call = stub.Generate(inference_pb2.GenerateRequest(prompt="to be", params=LONG), timeout=30)
    next(call)
    ch.close()
    assert wait_until(lambda: engine_idle(engine))
    assert _cancelled_not_finished(engine)


def test_deadline_is_honoured_and_frees_the_slot(start):
    stub, engine, _ = start(max_slots=1)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(inference_pb2.GenerateRequest(prompt="to be", params=LONG), timeout=0.05))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine_idle(engine))
    assert _cancelled_not_finished(engine)


def test_full_queue_is_resource_exhausted(start):
    stub, engine, _ = start(max_slots=1, max_queue=1)
    running = stub.Generate(inference_pb2.GenerateRequest(prompt="to be", params=LONG), timeout=30)
    next(running)
    queued = stub.Generate(inference_pb2.GenerateRequest(prompt="or", params=LONG), timeout=30)
    assert wait_until(lambda: engine.stats().queued == 1)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(inference_pb2.GenerateRequest(prompt="not", params=LONG), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in err.value.details()
    running.cancel()
    queued.cancel()
    assert wait_until(lambda: engine_idle(engine))
    assert _cancelled_not_finished(engine, 2)


def test_admission_counts_waiting_requests_only(start):
    """Issue 22 finding 5: --max-queue 0 refused every request on an idle server, and with 2 slots and a queue
    of 2, four simultaneous requests got a RESOURCE_EXHAUSTED."""
    stub, engine, _ = start(max_slots=2, max_queue=0)
    assert [
        r.finish_reason for r in stub.Generate(inference_pb2.GenerateRequest(prompt="to be", params=SHORT), timeout=30)
    ][-1] == (inference_pb2.FINISH_REASON_LENGTH)
    batch = stub.GenerateBatch(inference_pb2.GenerateBatchRequest(requests=[
        inference_pb2.GenerateRequest(prompt=p, params=SHORT) for p in ("to", "be")
    ]), timeout=30)  # fmt: skip
    assert [r.finish_reason for r in batch.results] == [inference_pb2.FINISH_REASON_LENGTH] * 2
    stub, engine, _ = start(max_slots=2, max_queue=2)
    four = inference_pb2.GenerateBatchRequest(
        requests=[inference_pb2.GenerateRequest(prompt="to be", params=SHORT)] * 4
    )
    assert [r.finish_reason for r in stub.GenerateBatch(four, timeout=30).results] == [
        inference_pb2.FINISH_REASON_LENGTH
    ] * 4
    with pytest.raises(grpc.RpcError) as err:  # 2 running + 2 waiting, then one more is too many
        stub.GenerateBatch(
            inference_pb2.GenerateBatchRequest(requests=[inference_pb2.GenerateRequest(prompt="t", params=LONG)] * 5),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert wait_until(lambda: engine_idle(engine))


def test_unhonourable_sampling_values_are_refused_and_results_carry_errors(start):
    """Issue 22 finding 1: temperature 1e-40 passed validation, then failed every request of its engine step;
    GenerateResult had no field saying why a request failed."""
    stub, engine, _ = start()
    good = inference_pb2.GenerateRequest(prompt="to be", params=SHORT)
    for bad_params, field in [
        (inference_pb2.SamplingParameters(max_new_tokens=3, temperature=1e-40, has_temperature=True), "temperature"),
        (inference_pb2.SamplingParameters(max_new_tokens=3, repetition_penalty=1e-40), "repetition_penalty"),
    ]:
        bad = inference_pb2.GenerateRequest(prompt="to be", params=bad_params)
        with pytest.raises(grpc.RpcError) as err:
            stub.GenerateBatch(inference_pb2.GenerateBatchRequest(requests=[good, good, bad, good]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"requests[2].params.{field}" in err.value.details() and "[0.01, " in err.value.details()
    assert "error" in inference_pb2.GenerateResult.DESCRIPTOR.fields_by_name
    results = stub.GenerateBatch(inference_pb2.GenerateBatchRequest(requests=[good] * 4), timeout=30).results
    assert all(r.finish_reason == inference_pb2.FINISH_REASON_LENGTH and r.error == "" for r in results)


class _FakeHandle:
    """What `_StreamPump` reads of a RequestHandle: chunks put by the test stand for the engine's."""

    def __init__(self) -> None:
        self.queued: list[Chunk] = []

    def ready(self) -> bool:
        return bool(self.queued)

    def next_chunks(self, timeout: float) -> list[Chunk]:
        taken, self.queued = self.queued, []
        return taken


def _token(i: int) -> Chunk:
    return Chunk("r", (i,), chr(97 + i))


def test_pump_sends_the_first_token_alone_then_gathers_under_the_budget_and_never_holds_the_final():
    """AsyncInferenceService's pump: a stream's first token goes at once and alone (TTFT), the next tokens wait for the
    stream's share of the budget (2 streams / 20 messages/s = 0.1 s) and go as one message, and a final chunk goes at
    the next pass whatever the interval; a handler that is not waiting (writing) leaves its tokens to gather."""

    async def run() -> list[list[Chunk]]:
        pump, handles = _StreamPump(messages_per_s=20.0), [_FakeHandle(), _FakeHandle()]
        a, b = (pump.open(h) for h in handles)
        pump._task.cancel()  # the test drives the passes, with its own clock
        got = []

        async def one_message(stream, now: float) -> list[Chunk] | None:
            message = asyncio.ensure_future(stream.next_message())
            await asyncio.sleep(0)  # the handler is now waiting
            pump.deliver(now)
            await asyncio.sleep(0)
            if message.done():
                return message.result()
            message.cancel()
            return None

        handles[0].queued = [_token(0), _token(1)]
        got.append(await one_message(a, 10.0))  # the first token alone
        got.append(await one_message(a, 10.05))  # token 1 is held: 0.05 s < 0.1 s
        handles[0].queued = [_token(2)]
        got.append(await one_message(a, 10.15))  # due: tokens 1 and 2 together
        handles[0].queued = [_token(3), Chunk("r", (4,), "e", finish_reason=FinishReason.LENGTH)]
        got.append(await one_message(a, 10.16))  # the final chunk is not held
        assert (await one_message(b, 10.2)) is None  # nothing made for b yet
        pump.close(a)
        pump.close(b)
        return got

    first, held, gathered, final = asyncio.run(run())
    assert [c.token_ids for c in first] == [(0,)]
    assert held is None
    assert [c.token_ids for c in gathered] == [(1,), (2,)]
    assert [c.token_ids for c in final] == [(3,), (4,)] and final[-1].final
    merged = _merged(gathered + final)
    assert merged.token_ids == (1, 2, 3, 4) and merged.text == "bcde" and merged.final


def test_aio_server_answers_tokenize_and_list_models_in_its_thread_pool_and_stops(tiny):
    """The plain (non-coroutine) RPCs run in the aio server's pool; stop() ends its loop thread."""
    engine = Engine(TorchRunner(tiny.model, n_slots=1), tiny.tokenizer)
    model = ServedModel(id=tiny.model_id, name="tiny-test", path=tiny.path, manifest=load_artifact(tiny.path).manifest)
    running = start_grpc(engine, model, server="aio")
    try:
        with channel(running.address) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            assert stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models[0].id == tiny.model_id
            with pytest.raises(grpc.RpcError) as err:
                stub.Tokenize(inference_pb2.TokenizeRequest(text="Q"), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("text:")
    finally:
        running.stop(0)
        engine.close()
    assert not running._thread.is_alive()
    with pytest.raises(ValueError, match="server must be one of"):
        start_grpc(engine, model, server="gevent")


def test_pump_paces_regular_messages_server_wide_round_robin_within_the_hold_bound():
    """The budget is also a server-wide pace: 20 streams all due in one pass get at most the banked allowance
    (1000 messages/s banks 5 ms: 5 messages), the next pass serves the streams after them (round-robin), and no
    stream's tokens wait longer than STREAM_HOLD_MAX_S whatever the allowance."""

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        pump = _StreamPump(messages_per_s=1000.0)
        handles = [_FakeHandle() for _ in range(20)]
        streams = [pump.open(h) for h in handles]
        pump._task.cancel()  # the test drives the passes, with its own clock

        def one_pass(now: float) -> list[int]:
            for s, h in zip(streams, handles):
                h.queued.append(_token(1))
                if s.waiter is None:
                    s.waiter = loop.create_future()  # every handler waits for its next message
            waiters = [s.waiter for s in streams]
            pump.deliver(now)
            return [i for i, w in enumerate(waiters) if w.done()]

        served = [one_pass(0.0)]  # first tokens: all at once, whatever the allowance
        served.append(one_pass(0.02))  # all due (20 streams / 1000 per s): the allowance banked, 5
        served.append(one_pass(0.021))  # 1 ms more: one more, the next in turn
        served.append(one_pass(0.045))  # all due again: 5 more, from where the last pass stopped (not from 0)
        served.append(one_pass(0.0451 + service.STREAM_HOLD_MAX_S))  # past the hold bound: everyone
        return served

    first, banked, next_one, in_turn, held_long = asyncio.run(run())
    assert first == list(range(20))
    assert banked == [0, 1, 2, 3, 4]
    assert next_one == [5]
    assert in_turn == [6, 7, 8, 9, 10]
    assert held_long == list(range(20))


def test_aio_server_with_tls_and_a_token_streams_and_keeps_health_open(tiny, tmp_path):
    """The aio construction's TLS and bearer token, as rpc.server's: a stream with the token over TLS, UNAUTHENTICATED
    without it, health answered without it; reflection lists the service."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    subprocess.run([*openssl, "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    engine = Engine(TorchRunner(tiny.model, n_slots=1), tiny.tokenizer)
    model = ServedModel(id=tiny.model_id, name="tiny-test", path=tiny.path, manifest=load_artifact(tiny.path).manifest)
    running = start_grpc(
        engine, model, host="localhost", tls_cert=cert.read_bytes(), tls_key=key.read_bytes(), token="t"
    )
    request = inference_pb2.GenerateRequest(prompt="to be", params=SHORT)
    try:
        with channel(f"localhost:{running.port}", tls_ca=cert.read_bytes(), token="t") as ch:
            responses = list(inference_pb2_grpc.InferenceServiceStub(ch).Generate(request, timeout=30))
            assert sum(len(r.token_ids) for r in responses) == 3
            assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
            reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            assert SERVICE_NAME in [s.name for s in next(reflect).list_services_response.service]
        with channel(f"localhost:{running.port}", tls_ca=cert.read_bytes()) as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(inference_pb2_grpc.InferenceServiceStub(ch).Generate(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert wait_until(lambda: engine_idle(engine))
    finally:
        running.stop(0)
        engine.close()
