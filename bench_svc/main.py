"""`./tinylm bench` (run suites here, now) and `python -m bench_svc.main serve` (BenchService + its queue worker).

    ./tinylm bench [--suites a,b] [--model ID] [--address HOST:PORT] [--quick] [--out DIR]
    python -m bench_svc.main serve --host H --port P --redis-url URL

The only place in bench_svc that reads the environment: TINYLM_HOME (default ~/.tinylm; artifacts under
$TINYLM_HOME/artifacts), TINYLM_REDIS_URL, TINYLM_TOKEN. Results go to bench_svc/results inside a checkout
(else $TINYLM_HOME/results) for a local run, and to $TINYLM_HOME/results/<job id> for a job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from bench_svc.loopback import check_loopback
from bench_svc.model_source import resolve_model
from bench_svc.registry import SUITES, needing_a_model, parse_suites
from bench_svc.runner import run_suites
from bench_svc.suite import SuiteCancelled, SuiteContext
from model.artifact import ArtifactError

__all__ = ["main"]

log = logging.getLogger("bench_svc")

REPO_ROOT = Path(__file__).resolve().parent.parent
THREADS_HELP = "torch CPU threads (0: torch's default); 1 gives steadier figures on a machine others share"


def _set_threads(parser: argparse.ArgumentParser, threads: int) -> None:
    if threads < 0:
        parser.error(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def _home() -> Path:
    return Path(os.environ.get("TINYLM_HOME") or Path.home() / ".tinylm").expanduser()


def _default_results() -> Path:
    """bench_svc/results when this code runs from a git checkout, else $TINYLM_HOME/results."""
    if (REPO_ROOT / ".git").exists():
        return REPO_ROOT / "bench_svc" / "results"
    return _home() / "results"


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tinylm bench: --device cuda, but torch sees no CUDA GPU here")
    return choice


def _print_progress(message: str, fraction: float, metrics) -> None:
    shown = f"[{fraction * 100:5.1f}%] " if fraction >= 0 else "         "
    print(shown + message, file=sys.stderr, flush=True)


def _run_local(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tinylm bench", description="run benchmark suites and write results and report.md"
    )
    parser.add_argument(
        "--suites", default="", help=f"comma-separated, any of: {', '.join(SUITES)} (default: kvcache,memory)"
    )
    parser.add_argument("--model", default="", help="artifact id, name or folder (default: a random-init --preset)")
    parser.add_argument("--preset", default="shakespeare-char", help="random-init model when no --model is given")
    parser.add_argument("--address", default="", help="InferenceService host:port (loopback) for the inference suite")
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke tests, the demo)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {_default_results()})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device of in-process suites")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    args = parser.parse_args(argv)
    _set_threads(parser, args.threads)
    try:
        names = parse_suites(args.suites.split(","))
    except ValueError as err:
        parser.error(f"--suites: {err}")
    if args.address:
        try:
            check_loopback(args.address)
        except ValueError as err:
            parser.error(f"--address: {err}")
    model_path = None
    needy = needing_a_model(names, args.address)
    if args.model or needy:
        try:
            model_path = resolve_model(_home() / "artifacts", args.model)
        except ArtifactError as err:
            print(
                f"tinylm bench: --model: {err}" + (f" (suites {', '.join(needy)} need one)" if needy else ""),
                file=sys.stderr,
            )
            return 2
    out_dir = (args.out or _default_results()).resolve()
    ctx = SuiteContext(
        out_dir=out_dir,
        repo_root=REPO_ROOT,
        command=("./tinylm", "bench", *argv),
        quick=args.quick,
        model_path=model_path,
        preset=args.preset,
        inference_address=args.address,
        device=_device(args.device),
        python=sys.executable,
        threads=args.threads,
        progress=_print_progress,
    )
    try:
        outcome = run_suites(names, ctx)
    except (KeyboardInterrupt, SuiteCancelled):
        print("tinylm bench: interrupted", file=sys.stderr)
        return 130
    print(f"\n{'suite':<10} {'status':<8} {'seconds':>8}  files")
    for r in outcome.results:
        print(f"{r.suite:<10} {r.status.split(':')[0]:<8} {r.seconds:>8.1f}  {' '.join(p.name for p in r.files)}")
        if not r.ok:
            print(f"{'':<10} {r.status}")
    print(f"\nreport: {outcome.report}  (device {outcome.device}, commit {outcome.commit})")
    return 1 if any(r.status.startswith("failed") for r in outcome.results) else 0


def _serve(argv: list[str]) -> int:
    # The service's imports (Redis, gRPC) stay here: a local run needs neither, and the GPU machine has no redis-py.
    from bench_svc.service import SERVICE_NAME, BenchService
    from bench_svc.worker import BenchWorkerConfig, make_worker, run_worker_thread
    from jobs.metrics import JobMetrics, serve_metrics
    from jobs.queue import JobQueue
    from protos import bench_pb2_grpc
    from rpc.server import serve_from_args, serve_until_signalled

    parser = argparse.ArgumentParser(
        prog="python -m bench_svc.main serve", description="BenchService and its queue worker"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument("--redis-url", default=os.environ.get("TINYLM_REDIS_URL", ""), help="the job queue's Redis")
    parser.add_argument("--results", type=Path, default=_home() / "results", help="where each job's folder goes")
    parser.add_argument("--workers", type=int, default=1, help="bench jobs run at once (each measures this machine)")
    parser.add_argument("--max-queued", type=int, default=16, help="bench jobs that may wait before RESOURCE_EXHAUSTED")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--preset", default="shakespeare-char", help="random-init model for jobs that name none")
    parser.add_argument("--tls-cert", type=Path, default=None)
    parser.add_argument("--tls-key", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics (queue depth, running "
        "jobs, dead letters, job durations) on this port of --host (0: a free one); off by default",
    )
    args = parser.parse_args(argv)
    _set_threads(parser, args.threads)
    if not args.redis_url:
        parser.error("--redis-url (or TINYLM_REDIS_URL) is required")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    queue = JobQueue(args.redis_url)
    config = BenchWorkerConfig(
        artifacts_root=_home() / "artifacts",
        results_root=args.results.resolve(),
        repo_root=REPO_ROOT,
        device=_device(args.device),
        preset=args.preset,
    )
    servicer = BenchService(queue, config.artifacts_root, max_queued=args.max_queued)
    running = serve_from_args(
        [(bench_pb2_grpc.add_BenchServiceServicer_to_server, servicer)],
        [SERVICE_NAME],
        args,
        token=os.environ.get("TINYLM_TOKEN"),
    )
    stop = threading.Event()
    metrics = JobMetrics(queue) if args.metrics_port is not None else None
    on_finished = metrics.observe if metrics else None
    threads = [
        run_worker_thread(make_worker(JobQueue(args.redis_url), config, on_finished=on_finished), stop)
        for _ in range(args.workers)
    ]
    log.info(
        "BenchService on %s (redis %s, %d worker(s), results in %s)",
        running.address,
        args.redis_url,
        len(threads),
        config.results_root,
    )
    metrics_server = serve_metrics(metrics.registry, args.host, args.metrics_port) if metrics else None
    if metrics_server:
        print(f"metrics on {metrics_server.url}", flush=True)
    serve_until_signalled(running, threads, stop, drain_s=30.0)
    if metrics_server:
        metrics_server.stop()
    queue.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`serve ...` runs the service; anything else is a local benchmark run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    return _run_local(argv)


if __name__ == "__main__":
    sys.exit(main())
