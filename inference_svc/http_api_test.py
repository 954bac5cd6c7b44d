"""The OpenAI-compatible HTTP API on a real uvicorn server on loopback, driven by the pinned `openai` client, beside
the gRPC service on the same engine: same greedy text, OpenAI's error shape naming the field, 429 on a full queue,
a disconnected stream gives its slot back, and /metrics counts exactly the requests sent."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference_svc.engine import Engine
from inference_svc.http_api import build_app
from inference_svc.http_server import serve_http
from inference_svc.metrics import EngineMetrics
from inference_svc.runner import TorchRunner
from inference_svc.service import SERVICE_NAME, InferenceService, ServedModel
from inference_svc.testing import engine_idle, wait_until
from model.artifact import load_artifact
from protos import inference_pb2, inference_pb2_grpc
from rpc.client import channel
from rpc.server import serve

TOKEN = "s3cret"


@pytest.fixture
def start(tiny):
    """start(max_slots, max_queue, token) -> (openai client, gRPC stub, engine, base url); stopped at teardown."""
    opened = []

    def _start(max_slots: int = 2, max_queue: int = 8, token: str | None = None):
        engine = Engine(TorchRunner(tiny.model, n_slots=max_slots), tiny.tokenizer, max_queue=max_queue)
        model = ServedModel(
            id=tiny.model_id, name="tiny-test", path=tiny.path, manifest=load_artifact(tiny.path).manifest
        )
        grpc_server = serve(
            [(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceService(engine, model))],
            [SERVICE_NAME],
            max_workers=16,
            token=token,
        )
        http = serve_http(build_app(engine, model, EngineMetrics(engine, "tiny-test"), token=token))
        ch = channel(grpc_server.address, token=token)
        client = openai.OpenAI(base_url=f"{http.url}/v1", api_key=token or "unused", max_retries=0, timeout=60)
        opened.append((client, ch, http, grpc_server, engine))
        return client, inference_pb2_grpc.InferenceServiceStub(ch), engine, http.url

    yield _start
    for client, ch, http, grpc_server, engine in opened:
        client.close()
        ch.close()
        http.stop()
        grpc_server.stop(0)
        engine.close()


def _grpc_text(stub, prompt: str, max_new_tokens: int) -> str:
    params = inference_pb2.SamplingParameters(max_new_tokens=max_new_tokens, temperature=0.0, has_temperature=True)
    return "".join(
        r.text for r in stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, params=params), timeout=60)
    )


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_greedy_text_equals_grpc_streamed_and_not(start):
    client, stub, engine, _ = start()
    for prompt, n in (("to be", 20), ("whether 'tis", 33)):
        expected = _grpc_text(stub, prompt, n)
        whole = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=n, temperature=0)
        assert whole.choices[0].text == expected
        assert whole.choices[0].finish_reason == "length"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), n)
        chunks = list(
            client.completions.create(model="tiny-test", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        )
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == n
    assert engine_idle(engine)


def test_stop_top_k_and_repetition_penalty_are_the_engines(start):
    client, stub, _, _ = start()
    full = _grpc_text(stub, "to be", 30)
    stop = full[8:10]
    reply = client.completions.create(model="tiny-test", prompt="to be", max_tokens=30, temperature=0, stop=stop)
    assert reply.choices[0].text == full[: full.find(stop)] and reply.choices[0].finish_reason == "stop"
    seeded = dict(
        model="tiny-test",
        prompt="t",
        max_tokens=12,
        temperature=0.9,
        seed=5,
        extra_body={"top_k": 5, "repetition_penalty": 1.3},
    )
    assert client.completions.create(**seeded).choices[0].text == client.completions.create(**seeded).choices[0].text


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=1000), "max_tokens"),  # beyond the context of 128
        (dict(temperature=-1), "temperature"),
        (dict(seed=-3), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(n=2), "n"),
        (dict(extra_body={"top_k": -1}), "top_k"),
        (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
        (dict(extra_body={"frobnicate": 1}), "frobnicate"),
        (dict(prompt="to be \u00e9"), "prompt"),  # a character the tokenizer does not know
    ],
)
def test_bad_fields_answer_400_naming_the_field(start, kwargs, field):
    client, _, engine, _ = start()
    kwargs = {"model": "tiny-test", "prompt": "to be", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == field and err.value.body["type"] == "invalid_request_error"
    assert field in err.value.body["message"]
    assert engine_idle(engine) and sum(engine.stats().finished.values()) == 0


def test_models_health_unknown_model_and_token(start):
    client, _, _, url = start(token=TOKEN)
    assert [m.id for m in client.models.list()] == ["tiny-test"]
    with urllib.request.urlopen(f"{url}/health", timeout=10) as reply:  # open without the token
        assert json.loads(reply.read())["status"] == "ok"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="other", prompt="to be", max_tokens=2)
    assert err.value.body["param"] == "model"
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="tiny-test", prompt="to be", max_tokens=2)
    stranger.close()


def test_a_full_queue_answers_429(start):
    client, _, engine, _ = start(max_slots=1, max_queue=1)
    running = client.completions.create(model="tiny-test", prompt="to be", max_tokens=120, temperature=0, stream=True)
    next(iter(running))  # it holds the only slot
    waiting = client.completions.create(model="tiny-test", prompt="to be", max_tokens=120, temperature=0, stream=True)
    assert wait_until(lambda: engine.stats().queued == 1)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="tiny-test", prompt="to be", max_tokens=2)
    assert err.value.status_code == 429
    running.close()
    waiting.close()
    assert wait_until(lambda: engine_idle(engine))


def test_a_disconnected_stream_frees_its_slot(start):
    client, _, engine, _ = start(max_slots=1)
    stream = client.completions.create(model="tiny-test", prompt="to be", max_tokens=120, temperature=0, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text and engine.stats().running == 1
    stream.close()  # the client goes away mid-stream
    assert wait_until(lambda: engine_idle(engine))
    finished = engine.stats().finished
    assert finished["cancelled"] == 1 and finished["length"] == 0


def test_metrics_move_by_exactly_the_requests_sent(start):
    client, stub, _, url = start()
    before = _metrics(url)
    assert before[("tinylm_kv_slots_total", ())] == 2 and before[("tinylm_requests_running", ())] == 0
    finals = [client.completions.create(model="tiny-test", prompt="to be", max_tokens=7, temperature=0)]
    finals.append(
        list(client.completions.create(model="tiny-test", prompt="to be", max_tokens=5, temperature=0, stream=True))[-1]
    )
    finals.append(
        list(
            client.completions.create(
                model="tiny-test", prompt="to", max_tokens=30, temperature=0, stop=["e"], stream=True
            )
        )[-1]
    )
    _grpc_text(stub, "or not", 4)  # gRPC requests count too: one engine, one set of metrics
    after = _metrics(url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model_name": "tiny-test", **labels}.items())))
        return after[key] - before.get(key, 0.0)

    reasons = [f.choices[0].finish_reason for f in finals] + ["length"]
    for reason in ("length", "stop", "cancelled", "error"):
        assert delta("tinylm_requests_total", finish_reason=reason) == reasons.count(reason), reason
    assert delta("tinylm_prompt_tokens_total") == len("to be") * 2 + len("to") + len("or not")
    assert delta("tinylm_generation_tokens_total") == sum(f.usage.completion_tokens for f in finals) + 4
    for name in (
        "tinylm_time_to_first_token_seconds_count",
        "tinylm_request_queue_time_seconds_count",
        "tinylm_e2e_request_latency_seconds_count",
    ):
        assert delta(name) == 4, name
    assert after[("tinylm_kv_slots_in_use", ())] == 0 and after[("tinylm_requests_waiting", ())] == 0
