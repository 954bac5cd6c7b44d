"""The local stack: `./tinylm up | down | status`.

`up` starts redis-server on a free loopback port (unless TINYLM_REDIS_URL names one) and the four services, each
with its queue worker, as background processes; it waits until each answers its gRPC health check and prints the
addresses and HTTP URLs (the inference service's OpenAI-compatible API, every service's Prometheus /metrics).
State (pids, ports, log files) lives in $TINYLM_HOME/stack/state.json; `down` stops what it lists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.settings import Settings

__all__ = ["SERVICES", "add_service", "main", "read_state", "start_stack", "stop_stack"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str  # run as `python -m module serve ...`
    grpc_name: str  # what its health check answers for
    needs_redis: bool


SERVICES = [
    ServiceSpec("trainer", "trainer.main", "tinylm.v1.TrainerService", True),
    ServiceSpec("exporter", "exporter.main", "tinylm.v1.ExporterService", True),
    ServiceSpec("inference", "inference_svc.main", "tinylm.v1.InferenceService", False),
    ServiceSpec("bench", "bench_svc.main", "tinylm.v1.BenchService", True),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_state(settings: Settings) -> dict | None:
    path = settings.stack_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_healthy(address: str, service: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode} during start-up; see {log}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{service} at {address} not healthy after {timeout_s:.0f} s; see {log}")


def _start_redis(stack_dir: Path, timeout_s: float = 10) -> tuple[str, int]:
    """redis-server on a free loopback port: (url, pid). One that does not answer in time is stopped, not left
    running where no state file lists it."""
    port = free_port()
    data = stack_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    log = stack_dir / "logs" / "redis.log"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--logfile",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return f"redis://127.0.0.1:{port}/0", proc.pid
            except OSError:
                time.sleep(0.1)
    except BaseException:
        _stop_group(proc.pid, grace_s=2)
        raise
    _stop_group(proc.pid, grace_s=2)
    raise TimeoutError(f"redis-server did not answer on port {port} within {timeout_s:.0f} s; see {log}")


def start_stack(
    settings: Settings, *, only: list[str] | None = None, model: str | None = None, timeout_s: float = 120
) -> dict:
    """Starts Redis (if needed) and the services; returns the state written to state.json."""
    existing = read_state(settings)
    if existing and any(_alive(p["pid"]) for p in existing["processes"].values()):
        raise RuntimeError(
            f"a stack is already running (state in {settings.stack_dir / 'state.json'}); run ./tinylm down first"
        )
    (settings.stack_dir / "logs").mkdir(parents=True, exist_ok=True)
    state: dict = {"processes": {}, "started_unix": time.time()}
    try:
        if settings.redis_url:
            state["redis_url"] = settings.redis_url
        else:
            state["redis_url"], pid = _start_redis(settings.stack_dir)
            state["processes"]["redis"] = {"pid": pid, "log": str(settings.stack_dir / "logs" / "redis.log")}
        _write_state(settings, state)
        for spec in SERVICES:
            if not only or spec.name in only:
                add_service(settings, spec.name, model=model, timeout_s=timeout_s)
    except BaseException:
        stop_stack(settings)
        raise
    return read_state(settings)


def add_service(settings: Settings, name: str, *, model: str | None = None, timeout_s: float = 120) -> str:
    """Starts one service into the running stack (the inference service once a model exists, say); returns its address."""
    spec = next((s for s in SERVICES if s.name == name), None)
    if spec is None:
        raise ValueError(f"unknown service {name!r}; allowed: {', '.join(s.name for s in SERVICES)}")
    state = read_state(settings)
    if state is None:
        raise RuntimeError("no stack is running; ./tinylm up starts one")
    port = free_port()
    log = settings.stack_dir / "logs" / f"{spec.name}.log"
    argv = [sys.executable, "-m", spec.module, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if spec.needs_redis:
        argv += ["--redis-url", state["redis_url"]]
    if spec.name == "inference" and model:
        argv += ["--model", model]
    http_port = free_port()  # the inference service's OpenAI-compatible API and /metrics; a job service's /metrics
    argv += ["--http-port" if spec.name == "inference" else "--metrics-port", str(http_port)]
    urls = _http_urls(spec.name, http_port)
    env = {
        **os.environ,
        "TINYLM_HOME": str(settings.home),
        "TINYLM_REDIS_URL": state["redis_url"],
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    state["processes"][spec.name] = {
        "pid": proc.pid,
        "address": address,
        "log": str(log),
        "grpc": spec.grpc_name,
        **urls,
    }
    _write_state(settings, state)
    _wait_healthy(address, spec.grpc_name, proc, log, timeout_s)
    return address


def _http_urls(name: str, port: int) -> dict[str, str]:
    """The inference service serves the OpenAI-compatible API and /metrics on one port; a job service /metrics alone."""
    base = f"http://127.0.0.1:{port}"
    return (
        {"api": f"{base}/v1", "metrics": f"{base}/metrics"} if name == "inference" else {"metrics": f"{base}/metrics"}
    )


def _write_state(settings: Settings, state: dict) -> None:
    path = settings.stack_dir / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def stop_stack(settings: Settings, grace_s: float = 10) -> list[str]:
    """SIGTERM every process in state.json (services first, Redis last), SIGKILL what outlives `grace_s`."""
    state = read_state(settings)
    if not state:
        return []
    names = [n for n in state["processes"] if n != "redis"] + (["redis"] if "redis" in state["processes"] else [])
    stopped = []
    for name in names:
        if _stop_group(state["processes"][name]["pid"], grace_s):
            stopped.append(name)
    (settings.stack_dir / "state.json").unlink(missing_ok=True)
    return stopped


def _stop_group(pid: int, grace_s: float) -> bool:
    """SIGTERM the process group `pid` leads, SIGKILL it after `grace_s`; False when it was not running. A process
    that exits between the checks is not an error (one failure must not leave the rest running)."""
    if not _alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(settings: Settings) -> dict:
    state = read_state(settings) or {"processes": {}}
    out = {"redis_url": state.get("redis_url"), "services": {}}
    for name, proc in state["processes"].items():
        row = {"pid": proc["pid"], "alive": _alive(proc["pid"]), "log": proc["log"]}
        if "address" in proc:
            row["address"] = proc["address"]
            row["healthy"] = row["alive"] and _healthy(proc["address"], proc["grpc"])
            row.update({k: proc[k] for k in ("api", "metrics") if k in proc})
        out["services"][name] = row
    return out


def _healthy(address: str, service: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def main(argv: list[str]) -> int:
    verb, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"tinylm {verb}")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if verb == "up":
        parser.add_argument(
            "--only", default="", help=f"comma-separated subset of: {', '.join(s.name for s in SERVICES)}"
        )
        parser.add_argument(
            "--model", default=None, help="model id, name or path for the inference service (default: newest)"
        )
    args = parser.parse_args(rest)
    settings = Settings.from_env()
    if verb == "up":
        only = [s for s in args.only.split(",") if s]
        unknown = sorted(set(only) - {s.name for s in SERVICES})
        if unknown:
            parser.error(f"--only: unknown service(s) {unknown}; allowed: {', '.join(s.name for s in SERVICES)}")
        # A SIGTERM (or SIGHUP) mid-start unwinds like Ctrl-C, so start_stack stops what it already started.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
        try:
            state = start_stack(settings, only=only or None, model=args.model)
        except (RuntimeError, TimeoutError, OSError, ValueError) as err:
            print(f"tinylm up: {err}", file=sys.stderr)
            return 1
        _print(state, args.json, f"stack is up; logs in {settings.stack_dir / 'logs'}; stop it with ./tinylm down")
        return 0
    if verb == "down":
        stopped = stop_stack(settings)
        _print({"stopped": stopped}, args.json, "stopped: " + (", ".join(stopped) or "nothing was running"))
        return 0
    report = status(settings)
    down = [name for name, s in report["services"].items() if not s.get("healthy", s["alive"])]
    line = "no stack is running (./tinylm up starts one)" if not report["services"] else ""
    if down:
        line = f"not running or not healthy: {', '.join(down)}; see their logs, then ./tinylm down && ./tinylm up"
    _print(report, args.json, line)
    return 1 if down else 0


def _print(data: dict, as_json: bool, line: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    if data.get("redis_url"):
        print(f"redis      {data['redis_url']}")
    for name, proc in (data.get("processes") or data.get("services") or {}).items():
        if "address" in proc:
            health = "" if "healthy" not in proc else ("  healthy" if proc["healthy"] else "  NOT HEALTHY")
            print(f"{name:<10} {proc['address']:<22} pid {proc['pid']:<8} log {proc['log']}{health}")
            for key, label in (("api", "openai"), ("metrics", "metrics")):
                if key in proc:
                    print(f"{'':<10} {label:<8} {proc[key]}")
        elif proc.get("alive") is False:  # Redis has no gRPC address: say when it is gone
            print(f"{name:<10} {'NOT RUNNING':<22} pid {proc['pid']:<8} log {proc['log']}")
    if line:
        print(line)
