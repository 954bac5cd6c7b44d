"""A throw-away InferenceService on loopback, for an inference benchmark that was given no address.

It is the inference service's own entry point (`python -m inference_svc.main serve`, the way the stack launcher
starts it) in a child process on a free port; bench_svc never imports the engine itself.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench_svc.subprocess_suite import stop_process

__all__ = ["INFERENCE_MODULE", "SERVICE_NAME", "inference_server", "wait_healthy"]

INFERENCE_MODULE = "inference_svc.main"
SERVICE_NAME = "tinylm.v1.InferenceService"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, service: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Returns once `service` at `address` answers SERVING; raises RuntimeError when `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode} during start-up")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{service} at {address} not healthy after {timeout_s:.0f} s")


@contextlib.contextmanager
def inference_server(
    python: str, repo_root: Path, model: Path | None, *, start_timeout_s: float = 120.0
) -> Iterator[str]:
    """Starts the service (serving `model`, else its default) and yields its address; stops it on exit.

    A start-up failure raises RuntimeError carrying the end of the server's log."""
    port = _free_port()
    argv = [python, "-m", INFERENCE_MODULE, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model is not None:
        argv += ["--model", str(model)]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(argv, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_healthy(f"127.0.0.1:{port}", SERVICE_NAME, start_timeout_s, proc)
            except RuntimeError as err:
                log.seek(0)
                tail = " | ".join(log.read().strip().splitlines()[-3:])
                raise RuntimeError(f"{err}: {tail}") from None
            yield f"127.0.0.1:{port}"
        finally:
            stop_process(proc)
