"""The gRPC side of jobs, written once for every service that fronts a queue (trainer, exporter, bench).

`queue_errors` maps queue failures to status codes; `job_status` looks up a job of one kind or aborts;
`watch_events` streams a job's events to a caller until a final state, a deadline, or the caller leaving.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import grpc

from jobs.errors import JobNotFound, QueueUnavailable
from jobs.kinds import FINAL_STATES, kind_name, parse_kind
from jobs.queue import JobQueue
from protos import jobs_pb2
from rpc.errors import invalid_argument, not_found

__all__ = ["job_status", "queue_errors", "watch_events"]

# A watch waits on Redis in chunks this long, so a caller that goes away frees its server thread within one
# chunk even while the job is quiet.
WATCH_CHUNK_S = 5.0


@contextlib.contextmanager
def queue_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """An unreachable Redis is UNAVAILABLE (naming its URL); a job that vanished mid-call is NOT_FOUND."""
    try:
        yield
    except QueueUnavailable as err:
        context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
    except JobNotFound as err:
        not_found(context, str(err))


def job_status(queue: JobQueue, job_id: str, kind: str, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
    """The status of job `job_id` of `kind`; aborts INVALID_ARGUMENT for an empty id, NOT_FOUND for no such job."""
    if not job_id:
        invalid_argument(context, "job_id", f"must be the id of a {kind} job, got ''")
    with queue_errors(context):
        try:
            status = queue.get(job_id)
        except JobNotFound:
            not_found(context, f"no {kind} job with id {job_id!r}")
    if status.job.kind != parse_kind(kind):
        not_found(context, f"job {job_id!r} is a {kind_name(status.job.kind)} job, not a {kind} job")
    return status


def watch_events(
    queue: JobQueue, job_id: str, context: grpc.ServicerContext, *, from_start: bool
) -> Iterator[jobs_pb2.JobEvent]:
    """A job's events until its final state; without `from_start`, only those from now on (and always the final one).

    Honours the call's deadline (DEADLINE_EXCEEDED) and stops as soon as the caller goes away.
    """
    since = 0.0 if from_start else time.time()
    left = context.time_remaining()
    deadline = None if left is None else time.monotonic() + left
    sent: set[str] = set()
    while context.is_active():
        chunk = WATCH_CHUNK_S if deadline is None else min(WATCH_CHUNK_S, deadline - time.monotonic())
        if chunk <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} was still running at the deadline")
        with queue_errors(context):
            try:
                # Each chunk replays the job's events from its start; those already sent are skipped by id.
                for event in queue.watch(job_id, timeout=chunk):
                    final = event.state in FINAL_STATES
                    if event.event_id not in sent and (final or event.time_unix >= since):
                        sent.add(event.event_id)
                        yield event
                    if final or not context.is_active():
                        return
            except TimeoutError:
                continue
