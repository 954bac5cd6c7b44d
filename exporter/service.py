"""ExporterService (protos/exporter.proto): validates export specs, enqueues them, reports on them.

No export logic here: the spec is checked (known formats, an existing model, resolved to its full id) and
goes to Redis through `jobs.queue.JobQueue`; an export worker (exporter/worker.py) does the work.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from exporter.errors import ExportError
from exporter.formats import parse_formats
from jobs.errors import JobNotFound, QueueUnavailable
from jobs.kinds import FINAL_STATES
from jobs.queue import JobQueue
from model.artifact import ArtifactError, ArtifactStore
from protos import exporter_pb2, exporter_pb2_grpc, jobs_pb2, trainer_pb2
from rpc.errors import invalid_argument, not_found, resource_exhausted

__all__ = ["SERVICE_NAME", "ExporterService"]

log = logging.getLogger(__name__)

SERVICE_NAME = "tinylm.v1.ExporterService"
_WATCH_CHUNK_S = 5.0  # longest a watch blocks before checking that its caller is still there


class ExporterService(exporter_pb2_grpc.ExporterServiceServicer):
    """gRPC front of the export queue; models are looked up in `store_root`; at most `max_queued` jobs wait."""

    def __init__(self, queue: JobQueue, store_root: Path, *, max_queued: int = 16) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.queue = queue
        self.store = ArtifactStore(store_root)
        self.max_queued = max_queued

    def _validated_spec(self, spec: jobs_pb2.ExportSpec, context: grpc.ServicerContext) -> jobs_pb2.ExportSpec:
        """The spec to enqueue, with formats normalised and the model resolved to its full id."""
        try:
            formats = parse_formats(list(spec.formats))
        except ExportError as err:
            invalid_argument(context, "spec.formats", str(err).removeprefix("formats: "))
        if not spec.model_id:
            invalid_argument(context, "spec.model_id", "must name an artifact (an id, a unique id prefix, or a name)")
        try:
            model_id = self.store.resolve(spec.model_id).name
        except ArtifactError as err:
            not_found(context, f"spec.model_id: {err}")
        resolved = jobs_pb2.ExportSpec()
        resolved.CopyFrom(spec)
        resolved.model_id = model_id
        del resolved.formats[:]
        resolved.formats.extend(formats)
        return resolved

    def StartExport(
        self, request: exporter_pb2.StartExportRequest, context: grpc.ServicerContext
    ) -> exporter_pb2.StartExportResponse:
        spec = self._validated_spec(request.spec, context)
        with _queue_errors(context):
            waiting = self.queue.list("export", "queued", limit=self.max_queued)
            if len(waiting) >= self.max_queued:
                resource_exhausted(context, f"the export queue is full ({self.max_queued} jobs waiting); try again later")
            job_id = self.queue.submit("export", spec, idempotency_key=request.idempotency_key)
            status = self.queue.get(job_id)
        log.info("enqueued export job %s (model %s, formats %s)", job_id, spec.model_id, ",".join(spec.formats))
        return exporter_pb2.StartExportResponse(job_id=job_id, status=status)

    def WatchExport(self, request: trainer_pb2.WatchRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.JobEvent]:
        """Events until a final state; without from_start, only those from now on (and always the final one)."""
        self._export_job(request.job_id, context)
        since = 0.0 if request.from_start else time.time()
        left = context.time_remaining()
        deadline = None if left is None else time.monotonic() + left
        sent: set[str] = set()
        # Short chunks: a caller that goes away frees this thread within one chunk even while the job is quiet.
        while context.is_active():
            chunk = _WATCH_CHUNK_S if deadline is None else min(_WATCH_CHUNK_S, deadline - time.monotonic())
            if chunk <= 0:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"export job {request.job_id} still running at the deadline")
            with _queue_errors(context):
                try:
                    for event in self.queue.watch(request.job_id, timeout=chunk):
                        final = event.state in FINAL_STATES
                        if event.event_id not in sent and (final or event.time_unix >= since):
                            sent.add(event.event_id)
                            yield event
                        if final or not context.is_active():
                            return
                except TimeoutError:
                    continue

    def GetExport(self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
        return self._export_job(request.job_id, context)

    def _export_job(self, job_id: str, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
        """Status of export job `job_id`; aborts INVALID_ARGUMENT (empty id) or NOT_FOUND (no such export job)."""
        if not job_id:
            invalid_argument(context, "job_id", "must be the id StartExport returned, got ''")
        with _queue_errors(context):
            try:
                status = self.queue.get(job_id)
            except JobNotFound:
                not_found(context, f"no export job with id {job_id!r}")
        if status.job.kind != jobs_pb2.JOB_KIND_EXPORT:
            not_found(context, f"job {job_id!r} is not an export job")
        return status


@contextlib.contextmanager
def _queue_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """An unreachable Redis is UNAVAILABLE; a job that vanished mid-call is NOT_FOUND."""
    try:
        yield
    except QueueUnavailable as err:
        context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
    except JobNotFound as err:
        not_found(context, str(err))
