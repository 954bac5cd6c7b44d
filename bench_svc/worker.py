"""The bench queue consumer: runs a bench job's suites with progress events and stores {files, report}.

Each job writes into its own folder (`spec.output_dir`, else `<results_root>/<job id>`), so a report is the
report of one job. Suites that cannot run here are recorded as skipped; the job fails only when every suite
it asked for failed.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from bench_svc.model_source import resolve_model
from bench_svc.registry import needing_a_model, parse_suites
from bench_svc.runner import RunOutcome, run_suites
from bench_svc.suite import SuiteCancelled, SuiteContext
from jobs.context import JobContext
from jobs.errors import JobCancelled
from jobs.queue import JobQueue
from jobs.worker import Worker
from protos import jobs_pb2

__all__ = ["BenchWorkerConfig", "bench_command", "make_handler", "make_worker", "run_worker_thread"]


@dataclass(frozen=True)
class BenchWorkerConfig:
    """Where a bench worker finds models and puts results, and what it runs on."""

    artifacts_root: Path  # $TINYLM_HOME/artifacts
    results_root: Path  # a job's results go to <results_root>/<job id> unless its spec names a folder
    repo_root: Path  # the checkout (git commit; working folder of subprocess suites)
    device: str = "cpu"  # torch device of the in-process suites
    preset: str = "shakespeare-char"  # the random-init model when a job names no artifact
    python: str = sys.executable


def bench_command(spec: jobs_pb2.BenchSpec, out_dir: Path) -> tuple[str, ...]:
    """The `./tinylm bench` command line that runs what `spec` asks (recorded in every result header)."""
    argv = ["./tinylm", "bench", "--suites", ",".join(parse_suites(spec.suites))]
    if spec.model_id:
        argv += ["--model", spec.model_id]
    if spec.inference_address:
        argv += ["--address", spec.inference_address]
    if spec.quick:
        argv.append("--quick")
    return (*argv, "--out", str(out_dir))


def _progress_to(job_ctx: JobContext) -> Callable[[str, float, Mapping[str, float]], None]:
    def progress(message: str, fraction: float, metrics: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        job_ctx.progress(message, fraction if 0.0 <= fraction <= 1.0 else None, **finite)

    return progress


def _result(outcome: RunOutcome, out_dir: Path) -> dict[str, Any]:
    suite_of = {f: r.suite for r in outcome.results for f in r.files}
    return {
        "out_dir": str(out_dir),
        "report": outcome.report.read_text(),
        "report_path": str(outcome.report),
        "device": outcome.device,
        "commit": outcome.commit,
        "files": [
            {
                "suite": suite_of.get(f, "report" if f == outcome.report else "summary"),
                "path": str(f),
                "format": f.suffix.lstrip("."),
            }
            for f in outcome.files
        ],
        "suites": [{"suite": r.suite, "status": r.status, "seconds": round(r.seconds, 2)} for r in outcome.results],
    }


def make_handler(config: BenchWorkerConfig) -> Callable[[JobContext], dict[str, Any]]:
    """The job handler: BenchSpec in, {out_dir, report, files, suites, device, commit} out."""

    def handle(job_ctx: JobContext) -> dict[str, Any]:
        spec: jobs_pb2.BenchSpec = job_ctx.job.bench
        names = parse_suites(spec.suites)
        model_path = None
        if spec.model_id or needing_a_model(names, spec.inference_address):
            model_path = resolve_model(config.artifacts_root, spec.model_id)
        out_dir = Path(spec.output_dir) if spec.output_dir else config.results_root / job_ctx.job.id
        ctx = SuiteContext(
            out_dir=out_dir,
            repo_root=config.repo_root,
            command=bench_command(spec, out_dir),
            quick=spec.quick,
            model_path=model_path,
            preset=config.preset,
            inference_address=spec.inference_address,
            device=config.device,
            python=config.python,
            progress=_progress_to(job_ctx),
            cancelled=job_ctx.cancelled,
        )
        try:
            outcome = run_suites(names, ctx)
        except SuiteCancelled as err:
            raise JobCancelled(str(err)) from None
        if all(r.status.startswith("failed") for r in outcome.results):
            raise RuntimeError("every suite failed: " + "; ".join(f"{r.suite}: {r.status}" for r in outcome.results))
        return _result(outcome, out_dir)

    return handle


def make_worker(
    queue: JobQueue,
    config: BenchWorkerConfig,
    consumer_name: str = "",
    *,
    on_finished: Callable[[str, str, float], None] | None = None,
) -> Worker:
    """A Worker on the bench stream. Bench jobs are long and measure a machine: one attempt at a time, two in all."""
    return Worker(
        queue,
        "bench",
        make_handler(config),
        consumer_name,
        max_attempts=2,
        visibility_timeout_s=60.0,
        on_finished=on_finished,
    )


def run_worker_thread(worker: Worker, stop: threading.Event) -> threading.Thread:
    """Starts `worker.run_forever(stop)` in a daemon thread and returns the thread."""
    thread = threading.Thread(
        target=worker.run_forever, args=(stop,), name=f"bench-worker-{worker.consumer}", daemon=True
    )
    thread.start()
    return thread
