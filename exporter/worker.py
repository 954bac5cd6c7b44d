"""The export-queue consumer: runs each export job with `exporter.export.export_artifact`.

Progress goes out as job events; a cancel stops the export between stages (nothing is published). The
result is the parity report (as in parity.json, for this export). A failed gate or a bad artifact fails the
job with the reason. A spec with `then_bench` enqueues that bench job with the model filled in, through the
queue's pipeline mechanism (`JobResult.next_jobs`). An export is idempotent: a retried or reclaimed job
rebuilds the same files and replaces them atomically.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.export import export_artifact
from exporter.parity import held_out_text
from jobs.context import JobContext, JobResult
from jobs.queue import JobQueue
from jobs.worker import Handler, Worker
from model.artifact import ArtifactError, ArtifactStore
from protos import jobs_pb2

__all__ = ["ExporterPaths", "make_export_handler", "make_worker", "run_workers", "json_safe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExporterPaths:
    """Where models live, and the corpus whose held-out tail scores the exports (None: model samples)."""

    store_root: Path
    corpus: Path | None = None


def json_safe(value: Any) -> Any:
    """The report with non-finite floats as None (a job result is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def make_export_handler(paths: ExporterPaths) -> Handler:
    """The handler a `jobs.worker.Worker` calls for each export job."""

    def handle(ctx: JobContext) -> JobResult:
        spec: jobs_pb2.ExportSpec = ctx.job.export
        try:
            artifact = ArtifactStore(paths.store_root).resolve(spec.model_id)
        except ArtifactError as err:
            raise ValueError(f"model_id: {err}") from None
        eval_text = held_out_text(paths.corpus.read_text(encoding="utf-8")) if paths.corpus else None
        ctx.progress(f"exporting {artifact.name} to {', '.join(spec.formats) or 'every format'}", 0.0)
        report = export_artifact(
            artifact,
            list(spec.formats),
            eval_text=eval_text,
            no_gate=spec.no_gate,
            progress=lambda message, fraction: ctx.progress(message, min(max(fraction, 0.0), 1.0)),
            check_cancelled=ctx.check_cancelled,
        )
        next_jobs = []
        if spec.HasField("then_bench"):
            bench = jobs_pb2.BenchSpec()
            bench.CopyFrom(spec.then_bench)
            bench.model_id = artifact.name
            next_jobs.append(("bench", bench))
        ctx.progress(f"done: {report['status']} ({', '.join(report['variants'])})", 1.0)
        return JobResult(result=json_safe(report), next_jobs=next_jobs)

    return handle


def make_worker(queue: JobQueue, paths: ExporterPaths, consumer_name: str = "", **worker_options: Any) -> Worker:
    """A Worker on the export stream running `make_export_handler(paths)`; options go to jobs.worker.Worker."""
    return Worker(queue, "export", make_export_handler(paths), consumer_name, **worker_options)


def run_workers(
    queue: JobQueue, paths: ExporterPaths, n: int, stop: threading.Event, **worker_options: Any
) -> list[threading.Thread]:
    """Start `n` worker threads that run until `stop` is set."""
    threads = []
    for i in range(n):
        worker = make_worker(queue, paths, **worker_options)
        thread = threading.Thread(target=worker.run_forever, args=(stop,), name=f"export-worker-{i}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads
