"""The BenchService gRPC servicer: validate a bench request, enqueue it, stream its events, serve its report.

Validation happens here, before anything is queued: unknown suites are INVALID_ARGUMENT listing the allowed
ones; a model that does not exist (or none at all, where a suite needs one) is NOT_FOUND; a full bench queue is
RESOURCE_EXHAUSTED. The work itself is done by the bench worker (bench_svc/worker.py) through Redis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import grpc

from bench_svc.loopback import check_loopback
from bench_svc.model_source import resolve_model
from bench_svc.registry import needing_a_model, parse_suites
from jobs.errors import QueueUnavailable
from jobs.kinds import state_name
from jobs.queue import JobQueue
from model.artifact import ArtifactError
from model.field_checks import check_int
from protos import bench_pb2, bench_pb2_grpc, jobs_pb2
from rpc.errors import invalid_argument, not_found, resource_exhausted
from rpc.job_calls import job_status, queue_errors, watch_events

__all__ = ["SERVICE_NAME", "BenchService"]

SERVICE_NAME = "tinylm.v1.BenchService"


class BenchService(bench_pb2_grpc.BenchServiceServicer):
    """Bench jobs on `queue`; models are looked up in `artifacts_root`; at most `max_queued` bench jobs wait."""

    def __init__(self, queue: JobQueue, artifacts_root: Path, *, max_queued: int = 16) -> None:
        check_int("max_queued", max_queued, 1)
        self.queue = queue
        self.artifacts_root = Path(artifacts_root)
        self.max_queued = max_queued

    def _validated_spec(self, spec: jobs_pb2.BenchSpec, context: grpc.ServicerContext) -> jobs_pb2.BenchSpec:
        """The spec to enqueue: suites checked, the model resolved to its full id; aborts the call otherwise."""
        try:
            names = parse_suites(spec.suites)
        except ValueError as err:
            invalid_argument(context, "spec.suites", str(err))
        if spec.inference_address:
            try:
                check_loopback(spec.inference_address)
            except ValueError as err:
                invalid_argument(context, "spec.inference_address", str(err))
        if spec.output_dir and not Path(spec.output_dir).is_absolute():
            invalid_argument(context, "spec.output_dir", f"must be an absolute path, got {spec.output_dir!r}")
        resolved = jobs_pb2.BenchSpec()
        resolved.CopyFrom(spec)
        needy = needing_a_model(names, spec.inference_address)
        if spec.model_id or needy:
            try:
                resolved.model_id = resolve_model(self.artifacts_root, spec.model_id).name
            except ArtifactError as err:
                reason = f" (suites {', '.join(needy)} need one)" if needy else ""
                not_found(context, f"spec.model_id: {err}{reason}")
        return resolved

    def StartBench(
        self, request: bench_pb2.StartBenchRequest, context: grpc.ServicerContext
    ) -> bench_pb2.StartBenchResponse:
        spec = self._validated_spec(request.spec, context)
        try:
            waiting = self.queue.list("bench", "queued", limit=self.max_queued)
            if len(waiting) >= self.max_queued:
                resource_exhausted(
                    context, f"the bench queue is full ({self.max_queued} jobs waiting); try again later"
                )
            job_id = self.queue.submit("bench", spec, idempotency_key=request.idempotency_key)
            return bench_pb2.StartBenchResponse(job_id=job_id, status=self.queue.get(job_id))
        except QueueUnavailable as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))

    def _bench_status(self, job_id: str, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
        return job_status(self.queue, job_id, "bench", context)

    def WatchBench(self, request, context: grpc.ServicerContext) -> Iterator[jobs_pb2.JobEvent]:
        """Events until a final state; without from_start, only events from now on (and always the final one)."""
        self._bench_status(request.job_id, context)
        yield from watch_events(self.queue, request.job_id, context, from_start=request.from_start)

    def GetReport(self, request: bench_pb2.GetReportRequest, context: grpc.ServicerContext) -> bench_pb2.BenchReport:
        if request.job_id:
            status = self._bench_status(request.job_id, context)
            if status.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                not_found(context, f"bench job {request.job_id} has no report: it is {state_name(status.state)}")
        else:
            with queue_errors(context):
                done = self.queue.list("bench", "succeeded", limit=1)
            if not done:
                not_found(context, "no bench job has finished yet")
            status = done[0]
        result = json.loads(status.result_json or "{}")
        files = [
            bench_pb2.BenchFile(suite=f["suite"], path=f["path"], format=f["format"]) for f in result.get("files", [])
        ]
        return bench_pb2.BenchReport(
            job_id=status.job.id,
            markdown=result.get("report", ""),
            files=files,
            device=result.get("device", ""),
            commit=result.get("commit", ""),
        )
