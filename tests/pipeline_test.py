"""End to end, as a user runs it: real redis-server, the trainer, exporter and bench services as processes,
real gRPC over loopback. train → export → bench is one chain of jobs, each enqueued by its parent; the model is
then served and streamed, from our Python stub and from a Node client that knows only the .proto files.
A second test kills the trainer service (and its worker) mid-training: the job is reclaimed and the chain completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from jobs.testing import RedisServer
from protos import bench_pb2, bench_pb2_grpc, common_pb2, exporter_pb2_grpc, inference_pb2, inference_pb2_grpc
from protos import jobs_pb2, trainer_pb2, trainer_pb2_grpc
from tools import stack
from tools.settings import Settings

pytestmark = pytest.mark.skipif(not os.environ.get("TINYLM_CORPUS"), reason="needs TINYLM_CORPUS (set by .ci/run)")

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 600


@pytest.fixture
def services(tmp_path):
    with RedisServer() as redis:
        settings = Settings(home=tmp_path / "home", redis_url=redis.url, corpus=os.environ["TINYLM_CORPUS"])
        state = stack.start_stack(settings, only=["trainer", "exporter", "bench"])
        try:
            yield settings, {n: p["address"] for n, p in state["processes"].items() if "address" in p}
        finally:
            stack.stop_stack(settings)


def _spec(results: Path) -> jobs_pb2.TrainSpec:
    bench = jobs_pb2.BenchSpec(suites=["kvcache"], quick=True, output_dir=str(results))
    export = jobs_pb2.ExportSpec(formats=["onnx", "int8"], no_gate=True, then_bench=bench)
    return jobs_pb2.TrainSpec(
        preset="tiny",
        tokenizer="char",
        device="cpu",
        max_steps=40,
        batch_size=8,
        eval_interval=20,
        model_name="e2e",
        then_export=export,
    )


def _wait(get, job_id: str, timeout_s: float = DEADLINE_S) -> jobs_pb2.JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = get(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)
        if status.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s} s")


def _child(get, job_id: str) -> str:
    status = get(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)
    assert len(status.child_ids) == 1, (
        f"job {job_id} should have enqueued exactly one follow-up, got {status.child_ids}"
    )
    return status.child_ids[0]


def _run_chain(addresses: dict, results: Path, *, kill_trainer_mid_run=None) -> tuple[str, str]:
    """Runs train → export → bench; returns (model id, bench job id)."""
    with grpc.insecure_channel(addresses["trainer"]) as t_ch, grpc.insecure_channel(addresses["exporter"]) as e_ch:
        trainer = trainer_pb2_grpc.TrainerServiceStub(t_ch)
        exporter = exporter_pb2_grpc.ExporterServiceStub(e_ch)
        job = trainer.StartTraining(trainer_pb2.StartTrainingRequest(spec=_spec(results)), timeout=30).job_id
        events = trainer.WatchTraining(trainer_pb2.WatchRequest(job_id=job, from_start=True), timeout=DEADLINE_S)
        first = next(e for e in events if e.state == jobs_pb2.JOB_STATE_RUNNING)
        assert first.job_id == job
        if kill_trainer_mid_run is not None:
            events.cancel()
            kill_trainer_mid_run()
    # A killed trainer service took its address with it: ask the (possibly new) one.
    with grpc.insecure_channel(addresses["trainer"]) as t_ch, grpc.insecure_channel(addresses["exporter"]) as e_ch:
        trainer = trainer_pb2_grpc.TrainerServiceStub(t_ch)
        exporter = exporter_pb2_grpc.ExporterServiceStub(e_ch)
        trained = _wait(trainer.GetTraining, job)
        assert trained.state == jobs_pb2.JOB_STATE_SUCCEEDED, trained.error
        if kill_trainer_mid_run is not None:
            assert trained.job.attempt >= 2, "the killed worker's job should have been reclaimed and run again"
        model_id = json.loads(trained.result_json)["model_id"]
        export_job = _child(trainer.GetTraining, job)
        exported = _wait(exporter.GetExport, export_job)
        assert exported.state == jobs_pb2.JOB_STATE_SUCCEEDED, exported.error
        return model_id, _child(exporter.GetExport, export_job)


def _bench_report(address: str, bench_job: str) -> bench_pb2.BenchReport:
    with grpc.insecure_channel(address) as ch:
        bench = bench_pb2_grpc.BenchServiceStub(ch)
        for event in bench.WatchBench(trainer_pb2.WatchRequest(job_id=bench_job, from_start=True), timeout=DEADLINE_S):
            if event.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED):
                assert event.state == jobs_pb2.JOB_STATE_SUCCEEDED, event.message
                break
        return bench.GetReport(bench_pb2.GetReportRequest(job_id=bench_job), timeout=30)


def test_train_export_serve_stream_bench(services, tmp_path):
    settings, addresses = services
    model_id, bench_job = _run_chain(addresses, tmp_path / "results")

    artifact = settings.artifacts / model_id
    assert (artifact / "onnx" / "model.onnx").is_file() and (artifact / "onnx" / "model-int8.onnx").is_file()
    assert json.loads((artifact / "parity.json").read_text())

    report = _bench_report(addresses["bench"], bench_job)
    assert "kvcache" in report.markdown and report.commit
    written = [Path(f.path) for f in report.files]
    assert any(p.suffix == ".png" for p in written) and all(p.exists() for p in written)

    address = stack.add_service(settings, "inference", model=model_id)
    with grpc.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        params = inference_pb2.SamplingParameters(max_new_tokens=16, temperature=0.0, has_temperature=True)
        request = inference_pb2.GenerateRequest(model=common_pb2.ModelRef(id=model_id), prompt="ROMEO:", params=params)
        chunks = list(stub.Generate(request, timeout=120))
    assert len(chunks) >= 2, "tokens should stream in more than one message"
    final = chunks[-1]
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH and final.usage.completion_tokens == 16
    python_ids = [t for c in chunks for t in c.token_ids]
    python_text = "".join(c.text for c in chunks)
    assert len(python_ids) == 16

    node = shutil.which("node")
    assert node, "node is needed for the second gRPC client (./tinylm setup installs nodejs)"
    script = Path("tests/node_client/generate.js").resolve()  # the real file: its node_modules lie beside it
    out = subprocess.run(
        [node, str(script), address, str(REPO), "ROMEO:", "16"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    node_result = json.loads(out.stdout)
    assert node_result["finish_reason"] == "FINISH_REASON_LENGTH"
    assert node_result["token_ids"] == python_ids and node_result["text"] == python_text


def test_killed_trainer_worker_mid_pipeline_still_completes(services, tmp_path):
    settings, addresses = services

    def kill_and_replace() -> None:
        pid = stack.read_state(settings)["processes"]["trainer"]["pid"]
        os.killpg(pid, signal.SIGKILL)  # the service and its worker thread die mid-job, without a goodbye
        addresses["trainer"] = stack.add_service(settings, "trainer")

    model_id, bench_job = _run_chain(addresses, tmp_path / "results", kill_trainer_mid_run=kill_and_replace)
    assert (settings.artifacts / model_id / "onnx" / "model-int8.onnx").is_file()
    assert _bench_report(addresses["bench"], bench_job).files
