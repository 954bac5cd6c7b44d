"""BenchService over real gRPC with a real Redis and a real bench worker: validation codes, a quick job end to end."""

import threading
from pathlib import Path

import grpc
import pytest

from bench_svc.registry import SUITES
from bench_svc.results_io import read_result
from bench_svc.service import SERVICE_NAME, BenchService
from bench_svc.worker import BenchWorkerConfig, make_worker, run_worker_thread
from jobs.queue import JobQueue
from jobs.testing import RedisServer
from protos import bench_pb2, bench_pb2_grpc, jobs_pb2, trainer_pb2
from rpc.client import channel
from rpc.server import serve

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def stack(redis_url, tmp_path):
    """A BenchService and one bench worker (tiny random-init preset) on their own key prefix; yields (stub, tmp)."""
    prefix = f"t{tmp_path.name}"
    queue = JobQueue(redis_url, prefix=prefix)
    config = BenchWorkerConfig(
        artifacts_root=tmp_path / "artifacts", results_root=tmp_path / "results", repo_root=REPO_ROOT, preset="tiny"
    )
    running = serve(
        [(bench_pb2_grpc.add_BenchServiceServicer_to_server, BenchService(queue, config.artifacts_root, max_queued=4))],
        [SERVICE_NAME],
    )
    stop = threading.Event()
    thread = run_worker_thread(make_worker(JobQueue(redis_url, prefix=prefix), config), stop)
    ch = channel(running.address)
    yield bench_pb2_grpc.BenchServiceStub(ch), tmp_path
    stop.set()
    ch.close()
    running.stop(0)
    thread.join(timeout=30)
    queue.close()


def _start(stub, **spec):
    return stub.StartBench(bench_pb2.StartBenchRequest(spec=jobs_pb2.BenchSpec(**spec)), timeout=10)


def _code(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_unknown_suites_are_invalid_argument_listing_the_allowed_ones(stack):
    stub, _ = stack
    code, details = _code(lambda: _start(stub, suites=["kvcache", "telepathy"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("spec.suites:") and "telepathy" in details and all(s in details for s in SUITES)


def test_other_bad_specs(stack):
    stub, _ = stack
    code, details = _code(lambda: _start(stub, suites=["inference"], inference_address="203.0.113.9:50051"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.inference_address:")
    code, details = _code(lambda: _start(stub, suites=["memory"], output_dir="relative/dir"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.output_dir:")


def test_a_missing_model_is_not_found(stack):
    stub, _ = stack
    code, details = _code(lambda: _start(stub, suites=["memory"], model_id="deadbeef00"))
    assert code == grpc.StatusCode.NOT_FOUND and "deadbeef00" in details
    # inference without an address starts its own server on an artifact, and the store is empty
    code, details = _code(lambda: _start(stub, suites=["inference"]))
    assert code == grpc.StatusCode.NOT_FOUND and "inference" in details


def test_unknown_jobs_are_not_found(stack):
    stub, _ = stack
    code, _ = _code(lambda: list(stub.WatchBench(trainer_pb2.WatchRequest(job_id="nope"), timeout=10)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(lambda: stub.GetReport(bench_pb2.GetReportRequest(job_id="nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = _code(lambda: stub.GetReport(bench_pb2.GetReportRequest(), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "no bench job" in details


def test_a_quick_bench_job_runs_end_to_end_with_events(stack):
    stub, tmp = stack
    out = tmp / "job-out"
    reply = _start(stub, suites=["memory", "kernels"], quick=True, output_dir=str(out))
    assert reply.job_id and reply.status.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)

    events = list(stub.WatchBench(trainer_pb2.WatchRequest(job_id=reply.job_id, from_start=True), timeout=180))
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1].message
    messages = [e.message for e in events]
    assert any(m.startswith("memory 1/") and "ETA" in m for m in messages)  # per-step progress with rate/ETA
    assert any("rate" in e.metrics for e in events)
    progress = [e.progress for e in events if e.progress >= 0]
    assert progress == sorted(progress) and progress[-1] == 1.0
    # without from_start a late watcher gets only what comes next: here just the final event
    late = list(stub.WatchBench(trainer_pb2.WatchRequest(job_id=reply.job_id), timeout=30))
    assert [e.state for e in late] == [jobs_pb2.JOB_STATE_SUCCEEDED]

    report = stub.GetReport(bench_pb2.GetReportRequest(job_id=reply.job_id), timeout=10)
    assert report.job_id == reply.job_id and report.device.startswith("cpu: ") and report.commit
    assert "## memory" in report.markdown and "skipped: needs CUDA" in report.markdown
    formats = {(f.suite, f.format) for f in report.files}
    assert {("memory", "csv"), ("memory", "json"), ("memory", "png"), ("report", "md")} <= formats
    assert all(Path(f.path).is_file() and Path(f.path).parent == out for f in report.files)
    assert (out / "report.md").read_text() == report.markdown
    header = read_result(next(out.glob("memory-*.json")))["header"]
    assert header["command"] == ["./tinylm", "bench", "--suites", "memory,kernels", "--quick", "--out", str(out)]

    newest = stub.GetReport(bench_pb2.GetReportRequest(), timeout=10)
    assert newest.job_id == reply.job_id


def test_a_full_queue_is_resource_exhausted(redis_url, tmp_path):
    queue = JobQueue(redis_url, prefix=f"full{tmp_path.name}")  # no worker consumes this prefix
    running = serve(
        [(bench_pb2_grpc.add_BenchServiceServicer_to_server, BenchService(queue, tmp_path, max_queued=2))],
        [SERVICE_NAME],
    )
    try:
        with channel(running.address) as ch:
            stub = bench_pb2_grpc.BenchServiceStub(ch)
            first = _start(stub, suites=["memory"], quick=True)
            _start(stub, suites=["memory"], quick=True)
            code, details = _code(lambda: _start(stub, suites=["memory"], quick=True))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in details
            # a job that has not run has no report yet
            code, details = _code(lambda: stub.GetReport(bench_pb2.GetReportRequest(job_id=first.job_id), timeout=10))
            assert code == grpc.StatusCode.NOT_FOUND and "queued" in details
    finally:
        running.stop(0)
        queue.close()
