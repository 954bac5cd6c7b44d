"""Fuzzing every request field of every service over real gRPC (issue 22): the four services on one loopback
server, a real redis-server for the job queues, a tiny model to serve. Whatever a caller sends (any type's
extremes, NaN and infinities, tiny positive floats, unknown enum values, huge or unusual Unicode strings, nested
messages), the answer is OK or a client-error status (INVALID_ARGUMENT naming a field, NOT_FOUND,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), never INTERNAL or UNKNOWN, and a normal request succeeds afterwards.

The strategies are derived from the proto descriptors, so a field added to a request is fuzzed without a change
here. No worker runs: submitted jobs stay queued (the fuzz is about the edge, not the work).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench_svc.service import SERVICE_NAME as BENCH, BenchService
from exporter.service import SERVICE_NAME as EXPORTER, ExporterService
from inference_svc.engine import Engine
from inference_svc.runner import TorchRunner
from inference_svc.service import SERVICE_NAME as INFERENCE, InferenceService, ServedModel
from jobs.queue import JobQueue
from jobs.testing import RedisServer
from model.artifact import load_artifact, save_artifact
from model.presets import get_preset
from model.tokenizers import CharTokenizer
from model.transformer import GPT
from protos import (
    bench_pb2,
    bench_pb2_grpc,
    common_pb2,
    exporter_pb2,
    exporter_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from rpc.client import channel
from rpc.server import serve
from trainer.service import SERVICE_NAME as TRAINER, TrainerService

# Examples per RPC: many where a call is quick (the engine's), few where one may wait out its deadline (Watch*).
EXAMPLES = {
    "Generate": 300,
    "GenerateBatch": 150,
    "Tokenize": 100,
    "WatchTraining": 10,
    "WatchExport": 10,
    "WatchBench": 10,
}
DEFAULT_EXAMPLES = 40
CALL_TIMEOUT_S = 2.0
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
INT32 = (-(2**31), -1, 0, 1, 2, 7, 64, 1025, 2**31 - 1)
INT64 = (*INT32, -(2**63), 2**63 - 1)
FLOATS = (0.0, -0.0, 1e-40, 1e-38, 1e-8, 0.01, 0.5, 1.0, 1.5, 10.0, 100.5, 3.4e38, -1.0, math.inf, -math.inf, math.nan)
UNUSUAL = (
    "",
    " ",
    "\x00",
    "to be",
    "model",
    "tiny-fuzz",
    "\u202e\u0301e\u0301",
    "\U0001f600" * 3,
    "../../etc/passwd",
    "kvcache",
    "onnx",
    "int4",
    "nosuch",
    "a" * 300,
    "\ufeff",
    "\u00ff\u0100",
    "0" * 32,
)


def _text() -> st.SearchStrategy[str]:
    """Strings a protobuf can carry (no lone surrogates): the named ones, arbitrary Unicode, and a huge one."""
    return st.one_of(
        st.sampled_from(UNUSUAL),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
        st.integers(1, 200_000).map(lambda n: "x" * n),
    )


def _scalar(field: FD) -> st.SearchStrategy:
    t = field.type
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return st.one_of(st.sampled_from(INT32), st.integers(-(2**31), 2**31 - 1))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64), st.integers(-(2**63), 2**63 - 1))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.one_of(st.sampled_from(FLOATS), st.floats(width=32 if t == FD.TYPE_FLOAT else 64))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_ENUM:  # proto3 enums are open: unknown numbers reach the server too
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 99))
    if t == FD.TYPE_STRING:
        return _text()
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    raise AssertionError(f"no strategy for {field.full_name}")


def message_strategy(descriptor, depth: int = 0) -> st.SearchStrategy[dict]:
    """Keyword arguments for the message `descriptor`: each field absent or fuzzed (nested messages to depth 2)."""
    parts = {}
    for field in descriptor.fields:
        if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            strategy = st.dictionaries(_scalar(key), _scalar(value), max_size=3)
        elif field.type == FD.TYPE_MESSAGE:
            if depth >= 2:
                continue
            inner = message_strategy(field.message_type, depth + 1)
            strategy = st.lists(inner, max_size=4) if field.is_repeated else inner
        else:
            strategy = _scalar(field)
            if field.is_repeated:
                strategy = st.lists(strategy, max_size=10)
        parts[field.name] = st.one_of(st.none(), strategy)
    return st.fixed_dictionaries(parts).map(lambda d: {k: v for k, v in d.items() if v is not None})


def _leaf_paths(descriptor, depth: int = 0) -> list[tuple[tuple, FD]]:
    """(path, field) of every scalar, repeated or map field, through nested messages (index 1 of a repeated one)."""
    out = []
    for field in descriptor.fields:
        is_map = field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
        if field.type == FD.TYPE_MESSAGE and not is_map:
            if depth < 3:
                step = (field.name, 1) if field.is_repeated else (field.name,)
                out += [(step + path, leaf) for path, leaf in _leaf_paths(field.message_type, depth + 1)]
        else:
            out.append(((field.name,), field))
    return out


def _value(field: FD) -> st.SearchStrategy:
    if field.type == FD.TYPE_MESSAGE:  # a map
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key), _scalar(value), max_size=3)
    return st.lists(_scalar(field), max_size=10) if field.is_repeated else _scalar(field)


def _set(tree: dict, path: tuple, value) -> dict:
    """A copy of the kwargs `tree` with the field at `path` (names, and indexes into repeated messages) set."""
    tree = dict(tree)
    head, rest = path[0], path[1:]
    if not rest:
        tree[head] = value
    elif isinstance(rest[0], int):
        items = [dict(i) for i in tree.get(head) or [{}, {}]]
        while len(items) <= rest[0]:
            items.append({})
        items[rest[0]] = _set(items[rest[0]], rest[1:], value)
        tree[head] = items
    else:
        tree[head] = _set(tree.get(head) or {}, rest, value)
    return tree


def mutation_strategy(base: dict, descriptor) -> st.SearchStrategy[dict]:
    """A valid request with one or two of its fields (anywhere in it) fuzzed: reaches past the first check."""
    leaves = _leaf_paths(descriptor)
    one = st.sampled_from(leaves).flatmap(lambda pf: _value(pf[1]).map(lambda v: (pf[0], v)))
    return st.lists(one, min_size=1, max_size=2).map(lambda changes: _apply(base, changes))


def _apply(base: dict, changes: list) -> dict:
    for path, value in changes:
        base = _set(base, path, value)
    return base


def build(cls, kwargs: dict):
    """The message of type `cls` from `kwargs` (nested dicts become nested messages)."""
    msg = cls()
    for name, value in kwargs.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            getattr(msg, name).update(value)
        elif field.type == FD.TYPE_MESSAGE and field.is_repeated:
            for item in value:
                _fill(getattr(msg, name).add(), item)
        elif field.type == FD.TYPE_MESSAGE:
            _fill(getattr(msg, name), value)
        elif field.is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def _fill(target, kwargs: dict) -> None:
    target.CopyFrom(build(type(target), kwargs))


def _field_names(descriptor, seen: set | None = None) -> set[str]:
    """Every field name in `descriptor` and the messages it holds: what an INVALID_ARGUMENT must mention."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    names = set()
    for field in descriptor.fields:
        names.add(field.name)
        if field.type == FD.TYPE_MESSAGE:
            names |= _field_names(field.message_type, seen)
    return names


@dataclass
class Live:
    stubs: dict[str, object]
    model_id: str
    job_ids: dict[str, str]  # kind -> a real job id, so Get/Watch sometimes hit one that exists


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("fuzz")
    tokenizer = CharTokenizer.from_corpus("to be, or not to be: that is the question.")
    torch.manual_seed(0)
    store = root / "home" / "artifacts"
    model_id = save_artifact(
        store, GPT(get_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer, name="tiny-fuzz", preset="tiny"
    )
    artifact = load_artifact(store / model_id)
    engine = Engine(TorchRunner(artifact.model, n_slots=4), tokenizer, max_queue=8)
    served = ServedModel(id=model_id, name="tiny-fuzz", path=store / model_id, manifest=artifact.manifest)
    with RedisServer() as redis_server, JobQueue(redis_server.url) as queue:
        server = serve(
            [
                (inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceService(engine, served)),
                (trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerService(queue, store)),
                (exporter_pb2_grpc.add_ExporterServiceServicer_to_server, ExporterService(queue, store, max_queued=4)),
                (bench_pb2_grpc.add_BenchServiceServicer_to_server, BenchService(queue, store, max_queued=4)),
            ],
            [INFERENCE, TRAINER, EXPORTER, BENCH],
            max_workers=32,
        )
        ch = channel(server.address)
        stubs = {
            INFERENCE: inference_pb2_grpc.InferenceServiceStub(ch),
            TRAINER: trainer_pb2_grpc.TrainerServiceStub(ch),
            EXPORTER: exporter_pb2_grpc.ExporterServiceStub(ch),
            BENCH: bench_pb2_grpc.BenchServiceStub(ch),
        }
        export = stubs[EXPORTER].StartExport(
            exporter_pb2.StartExportRequest(spec={"model_id": model_id, "formats": ["onnx"]}), timeout=10
        )
        try:
            yield Live(stubs=stubs, model_id=model_id, job_ids={"export": export.job_id})
        finally:
            ch.close()
            server.stop(0)
            engine.close()


def _methods() -> list[tuple[str, str]]:
    out = []
    for module, service in ((inference_pb2, "InferenceService"), (trainer_pb2, "TrainerService"),
                            (exporter_pb2, "ExporterService"), (bench_pb2, "BenchService")):  # fmt: skip
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            out.append((f"tinylm.v1.{service}", method.name))
    return out


def _request_class(service: str, method: str):
    module = {INFERENCE: inference_pb2, TRAINER: trainer_pb2, EXPORTER: exporter_pb2, BENCH: bench_pb2}[service]
    descriptor = module.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods_by_name[method].input_type
    for candidate in (module, common_pb2, inference_pb2, trainer_pb2, exporter_pb2, bench_pb2):
        cls = getattr(candidate, descriptor.name, None)
        if cls is not None and cls.DESCRIPTOR.full_name == descriptor.full_name:
            return cls
    raise AssertionError(descriptor.full_name)


def _call(live: Live, service: str, method: str, request) -> list:
    """Call and drain (a stream is read to its end or to the deadline); raises grpc.RpcError on a status."""
    rpc = getattr(live.stubs[service], method)
    reply = rpc(request, timeout=CALL_TIMEOUT_S)
    return list(reply) if hasattr(reply, "__next__") else [reply]


def _generation_errors(replies: list) -> list[str]:
    """A request the server accepted must not end in FINISH_REASON_ERROR: what was accepted can be honoured."""
    ends = [r for r in replies if isinstance(r, inference_pb2.GenerateResponse)]
    ends += [r for batch in replies if isinstance(batch, inference_pb2.GenerateBatchResponse) for r in batch.results]
    return [
        f"{r.request_id}: {r.error or 'no error text'}"
        for r in ends
        if r.finish_reason == inference_pb2.FINISH_REASON_ERROR
    ]


def _normal_request_succeeds(live: Live) -> None:
    chunks = list(live.stubs[INFERENCE].Generate(inference_pb2.GenerateRequest(
        prompt="to be", params=inference_pb2.SamplingParameters(max_new_tokens=3, temperature=0.0, has_temperature=True),
    ), timeout=30))  # fmt: skip
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert live.stubs[TRAINER].ListModels(common_pb2.ListModelsRequest(), timeout=10).models[0].id == live.model_id
    live.stubs[EXPORTER].GetExport(trainer_pb2.GetJobRequest(job_id=live.job_ids["export"]), timeout=10)


def _valid(method: str, live: Live) -> dict:
    """A request `method` accepts, as kwargs: the base that mutation_strategy fuzzes one or two fields of."""
    generate = {
        "prompt": "to be",
        "params": {"max_new_tokens": 3, "temperature": 0.8, "has_temperature": True, "seed": 1},
    }
    job = {"job_id": live.job_ids["export"]}
    return {
        "Generate": generate,
        "GenerateBatch": {"requests": [generate] * 3},
        "Tokenize": {"text": "to be"},
        "StartTraining": {"spec": {"preset": "tiny", "max_steps": 1, "device": "cpu",
                                   "then_export": {"formats": ["onnx"], "then_bench": {"suites": ["kvcache"]}}}},
        "StartExport": {"spec": {"model_id": live.model_id, "formats": ["onnx"], "then_bench": {"suites": ["kvcache"]}}},
        "StartBench": {"spec": {"suites": ["kvcache"], "model_id": live.model_id}},
        "ListModels": {"name_prefix": "tiny"},
    }.get(method, job)  # fmt: skip


@pytest.mark.parametrize("service, method", _methods(), ids=lambda v: v.split(".")[-1])
def test_fuzzed_requests_get_ok_or_a_client_error_naming_the_field(live, service, method):
    cls = _request_class(service, method)
    names = _field_names(cls.DESCRIPTOR)
    seen: dict[str, int] = {}
    lock = threading.Lock()

    @settings(max_examples=EXAMPLES.get(method, DEFAULT_EXAMPLES), deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(kwargs=st.one_of(message_strategy(cls.DESCRIPTOR), mutation_strategy(_valid(method, live), cls.DESCRIPTOR)),
           use_real_id=st.booleans())  # fmt: skip
    def fuzz(kwargs, use_real_id):
        if use_real_id and "job_id" in cls.DESCRIPTOR.fields_by_name and "job_id" not in kwargs:
            kwargs = {**kwargs, "job_id": live.job_ids["export"]}
        request = build(cls, kwargs)
        try:
            errors = _generation_errors(_call(live, service, method, request))
            assert not errors, f"{method}({request}) was accepted, then failed: {errors}"
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            assert code in CLIENT_ERRORS, f"{method}({request}) -> {code.name}: {details}"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                named = details.split(":")[0]
                assert any(name in named for name in names), f"{method}: {details!r} names no field of the request"
        with lock:
            seen[code.name] = seen.get(code.name, 0) + 1

    fuzz()
    _normal_request_succeeds(live)
