"""ExporterService end to end: real gRPC over loopback, a real redis-server, a worker thread that really exports."""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from exporter.conftest import LLAMA_TINY, TEXT, save_random
from exporter.service import SERVICE_NAME, ExporterService
from exporter.worker import ExporterPaths, make_worker
from jobs.queue import JobQueue
from jobs.testing import RedisServer
from protos import exporter_pb2, exporter_pb2_grpc, jobs_pb2, trainer_pb2
from rpc.client import channel
from rpc.server import serve


@pytest.fixture()
def stack(tmp_path):
    """Redis, the service, one worker thread, a store with one random-init model; yields (stub, queue, model_id, store)."""
    store = tmp_path / "artifacts"
    model_id = save_random(store, LLAMA_TINY, name="svc-model").name
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    paths = ExporterPaths(store_root=store, corpus=corpus)
    with RedisServer() as redis_server:
        queue = JobQueue(redis_server.url)
        server = serve(
            [(exporter_pb2_grpc.add_ExporterServiceServicer_to_server, ExporterService(queue, store, max_queued=2))],
            [SERVICE_NAME],
        )
        stop = threading.Event()
        worker = make_worker(JobQueue(redis_server.url), paths, poll_s=0.1, heartbeat_s=0.1, max_attempts=1)
        thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
        ch = channel(server.address)
        try:
            yield exporter_pb2_grpc.ExporterServiceStub(ch), queue, model_id, store, thread
        finally:
            stop.set()
            if thread.is_alive():
                thread.join(timeout=60)
            ch.close()
            server.stop(0)
            queue.close()


def _start(stub, model_id, *formats, **fields):
    spec = jobs_pb2.ExportSpec(model_id=model_id, formats=list(formats), **fields)
    return stub.StartExport(exporter_pb2.StartExportRequest(spec=spec), timeout=10)


def test_export_job_end_to_end_with_then_bench(stack):
    stub, queue, model_id, store, thread = stack
    thread.start()
    spec = jobs_pb2.ExportSpec(model_id=model_id[:8], formats=["hf", "onnx"])  # a prefix resolves to the full id
    spec.then_bench.suites.append("export")
    started = stub.StartExport(exporter_pb2.StartExportRequest(spec=spec), timeout=10)
    assert started.status.job.export.model_id == model_id
    assert list(started.status.job.export.formats) == ["onnx", "hf"]  # canonical order
    events = list(stub.WatchExport(trainer_pb2.WatchRequest(job_id=started.job_id, from_start=True), timeout=240))
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1].message
    messages = [e.message for e in events]
    assert any(m.startswith("onnx fp32") for m in messages) and any(m == "hf" for m in messages)

    status = stub.GetExport(trainer_pb2.GetJobRequest(job_id=started.job_id), timeout=10)
    report = json.loads(status.result_json)
    assert report["passed"] and set(report["variants"]) == {"onnx-fp32", "onnx-fp16", "hf"}
    assert report["reference"]["eval_source"] == "corpus held-out tail"
    assert (store / model_id / "onnx" / "model.onnx").is_file() and (store / model_id / "parity.json").is_file()
    (child_id,) = status.child_ids
    child = queue.get(child_id)
    assert child.job.kind == jobs_pb2.JOB_KIND_BENCH and child.job.bench.model_id == model_id
    assert list(child.job.bench.suites) == ["export"] and child.job.parent_id == started.job_id


def test_bad_requests(stack):
    stub, _, model_id, _, _ = stack
    with pytest.raises(grpc.RpcError) as err:
        _start(stub, model_id, "onnx", "tflite")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("spec.formats:") and "coreml" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _start(stub, "", "onnx")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.model_id" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # issue 22 finding 4: accepted, then the bench job failed
        _start(stub, model_id, "onnx", then_bench=jobs_pb2.BenchSpec(suites=["nosuch"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("spec.then_bench.suites[0]:") and "kvcache" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _start(stub, "feedfacefeedface", "onnx")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "svc-model" in err.value.details()
    for call in (
        stub.GetExport,
        lambda r, timeout: list(stub.WatchExport(trainer_pb2.WatchRequest(job_id=r.job_id), timeout=timeout)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(trainer_pb2.GetJobRequest(job_id="0" * 32), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_full_queue_and_idempotency(stack):
    stub, queue, model_id, _, _ = stack  # the worker thread is not started: jobs stay queued
    request = exporter_pb2.StartExportRequest(spec=jobs_pb2.ExportSpec(model_id=model_id), idempotency_key="k1")
    first = stub.StartExport(request, timeout=10)
    assert stub.StartExport(request, timeout=10).job_id == first.job_id
    _start(stub, model_id, "hf")
    with pytest.raises(grpc.RpcError) as err:
        _start(stub, model_id, "hf")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A job of another kind is not an export job.
    noop = queue.submit("noop", jobs_pb2.NoopSpec())
    with pytest.raises(grpc.RpcError) as err:
        stub.GetExport(trainer_pb2.GetJobRequest(job_id=noop), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_honours_the_deadline(stack):
    stub, _, model_id, _, _ = stack  # no worker: the job never finishes
    started = _start(stub, model_id, "hf")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchExport(trainer_pb2.WatchRequest(job_id=started.job_id, from_start=True), timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_failing_export_fails_the_job_with_the_reason(stack):
    stub, _, model_id, store, thread = stack
    thread.start()
    (store / model_id / "model.safetensors").write_bytes(b"corrupt")
    started = _start(stub, model_id, "hf")
    events = list(stub.WatchExport(trainer_pb2.WatchRequest(job_id=started.job_id, from_start=True), timeout=60))
    assert events[-1].state == jobs_pb2.JOB_STATE_FAILED
    status = stub.GetExport(trainer_pb2.GetJobRequest(job_id=started.job_id), timeout=10)
    assert "ExportError" in status.error and "sha256" in status.error
    assert not (store / model_id / "hf").exists()
