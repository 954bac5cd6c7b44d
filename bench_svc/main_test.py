"""`./tinylm bench` runs suites locally; `python -m bench_svc.main serve` starts exactly as the stack launcher starts it."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from bench_svc.local_server import wait_healthy
from bench_svc.main import main
from bench_svc.results_io import read_result
from bench_svc.service import SERVICE_NAME
from jobs.testing import RedisServer
from protos import bench_pb2, bench_pb2_grpc, jobs_pb2, trainer_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_local_run_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--suites", "memory,kernels", "--quick", "--preset", "tiny", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "report: " in printed.out and "memory 1/" in printed.err
    memory_json = next(out.glob("memory-*.json"))
    header = read_result(memory_json)["header"]
    assert header["command"] == [
        "./tinylm",
        "bench",
        "--suites",
        "memory,kernels",
        "--quick",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert (out / "report.md").is_file() and next(out.glob("memory-*.png")).is_file()


def test_bad_usage(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--suites", "kvcache,nonsense"])
    assert err.value.code == 2 and "allowed: kvcache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--address", "192.0.2.1:1", "--suites", "inference"])
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    assert main(["--suites", "memory", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    assert "no-such-model" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_as_the_stack_launcher_starts_it(tmp_path):
    with RedisServer() as redis_server:
        port = _free_port()
        env = {**os.environ, "TINYLM_HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
        argv = [
            sys.executable,
            "-m",
            "bench_svc.main",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--redis-url",
            redis_server.url,
            "--preset",
            "tiny",
            "--device",
            "cpu",
        ]
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            wait_healthy(f"127.0.0.1:{port}", SERVICE_NAME, 60, proc)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = bench_pb2_grpc.BenchServiceStub(ch)
                job = stub.StartBench(
                    bench_pb2.StartBenchRequest(spec=jobs_pb2.BenchSpec(suites=["memory"], quick=True)), timeout=10
                )
                events = list(
                    stub.WatchBench(trainer_pb2.WatchRequest(job_id=job.job_id, from_start=True), timeout=180)
                )
                assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1].message
                report = stub.GetReport(bench_pb2.GetReportRequest(), timeout=10)
            # a job's results default to $TINYLM_HOME/results/<job id>
            assert report.job_id == job.job_id and "## memory" in report.markdown
            assert (tmp_path / "results" / job.job_id / "report.md").is_file()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
