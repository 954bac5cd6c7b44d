"""ExporterService (protos/exporter.proto): validates export specs, enqueues them, reports on them.

No export logic here: the spec is checked (known formats, an existing model, resolved to its full id) and
goes to Redis through `jobs.queue.JobQueue`; an export worker (exporter/worker.py) does the work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc

from exporter.errors import ExportError
from exporter.formats import parse_formats
from jobs.queue import JobQueue
from jobs.spec_checks import NestedSpecError, check_bench_spec
from model.artifact import ArtifactError, ArtifactStore
from model.field_checks import check_int
from protos import exporter_pb2, exporter_pb2_grpc, jobs_pb2, trainer_pb2
from rpc.errors import invalid_argument, not_found, resource_exhausted
from rpc.job_calls import job_status, queue_errors, watch_events

__all__ = ["SERVICE_NAME", "ExporterService"]

log = logging.getLogger(__name__)

SERVICE_NAME = "tinylm.v1.ExporterService"


class ExporterService(exporter_pb2_grpc.ExporterServiceServicer):
    """gRPC front of the export queue; models are looked up in `store_root`; at most `max_queued` jobs wait."""

    def __init__(self, queue: JobQueue, store_root: Path, *, max_queued: int = 16) -> None:
        check_int("max_queued", max_queued, 1)
        self.queue = queue
        self.store = ArtifactStore(store_root)
        self.max_queued = max_queued

    def _validated_spec(self, spec: jobs_pb2.ExportSpec, context: grpc.ServicerContext) -> jobs_pb2.ExportSpec:
        """The spec to enqueue, with formats normalised and the model resolved to its full id."""
        try:
            formats = parse_formats(list(spec.formats))
        except ExportError as err:
            invalid_argument(context, "spec.formats", str(err).removeprefix("formats: "))
        try:
            check_bench_spec(spec.then_bench, "spec.then_bench.")
        except NestedSpecError as err:
            invalid_argument(context, err.field, err.reason)
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
        with queue_errors(context):
            waiting = self.queue.list("export", "queued", limit=self.max_queued)
            if len(waiting) >= self.max_queued:
                resource_exhausted(
                    context, f"the export queue is full ({self.max_queued} jobs waiting); try again later"
                )
            job_id = self.queue.submit("export", spec, idempotency_key=request.idempotency_key)
            status = self.queue.get(job_id)
        log.info("enqueued export job %s (model %s, formats %s)", job_id, spec.model_id, ",".join(spec.formats))
        return exporter_pb2.StartExportResponse(job_id=job_id, status=status)

    def WatchExport(
        self, request: trainer_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.JobEvent]:
        """Events until a final state; without from_start, only those from now on (and always the final one)."""
        self._export_job(request.job_id, context)
        yield from watch_events(self.queue, request.job_id, context, from_start=request.from_start)

    def GetExport(self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
        return self._export_job(request.job_id, context)

    def _export_job(self, job_id: str, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
        """Status of export job `job_id`; aborts INVALID_ARGUMENT (empty id) or NOT_FOUND (no such export job)."""
        return job_status(self.queue, job_id, "export", context)
