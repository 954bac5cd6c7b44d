"""The worker's side of the job queue: claim a job, run its handler with heartbeats, store the outcome.

At-least-once, as in Celery's acks_late: a stream entry is acked in the same atomic script that stores
the job's outcome, so a worker that dies mid-job leaves its entry pending, and XAUTOCLAIM hands it to
another worker after the visibility timeout. A failed attempt is retried after an exponential backoff
(a delayed set, as Sidekiq's retry set); after `max_attempts` the job goes to the dead-letter stream with
its last error. An entry that is not a valid job is dead-lettered too, and the worker carries on.
"""

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import redis
from google.protobuf.message import DecodeError

from jobs.connection import unavailable_as_error
from jobs.context import JobContext, JobResult
from jobs.errors import JobCancelled, PermanentJobError, QueueUnavailable
from jobs.heartbeat import Heartbeat, Lease
from jobs.kinds import KIND_NAMES, KindLike, parse_kind
from jobs.queue import JobQueue
from protos import jobs_pb2

__all__ = ["Handler", "Worker", "WorkerConfig", "default_consumer_name"]

log = logging.getLogger(__name__)

Handler = Callable[[JobContext], Union[Mapping[str, Any], JobResult, None]]
_PROMOTE_BATCH = 100  # due retries moved back to the stream per housekeeping pass
# (entry id, fields, the start script's outcome if claiming already started it)
Claimed = tuple[bytes, dict[bytes, bytes], Optional[list]]


class StopEvent(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: Optional[float] = None) -> bool: ...


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker claims, retries and gives up; validated once here."""

    visibility_timeout_s: float = 30.0  # a job whose worker has not beaten for this long is reclaimed
    max_attempts: int = 3  # attempts (a lost worker's included) before the job is dead-lettered
    backoff_base_s: float = 1.0  # wait before the 2nd attempt; doubles each attempt
    backoff_max_s: float = 300.0
    heartbeat_s: Optional[float] = None  # None: min(visibility_timeout_s / 3, 1 s)
    poll_s: float = 0.5  # longest block on the stream; also how often retries and dead workers are checked
    group: str = "workers"  # the consumer group: one per service
    store_retry_s: float = 300.0  # how long to keep trying to store an outcome while Redis is away

    def __post_init__(self) -> None:
        for name in ("visibility_timeout_s", "poll_s", "store_retry_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"need 0 <= backoff_base_s <= backoff_max_s, got {self.backoff_base_s} and {self.backoff_max_s}"
            )
        if self.heartbeat_s is not None and not 0 < self.heartbeat_s < self.visibility_timeout_s:
            raise ValueError(f"heartbeat_s must be in (0, visibility_timeout_s), got {self.heartbeat_s}")
        if not self.group:
            raise ValueError("group must be a non-empty consumer group name")

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else min(self.visibility_timeout_s / 3, 1.0)

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (from 1)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))


def default_consumer_name() -> str:
    """host-pid-random: unique per process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """Consumes one kind's stream in the kind's consumer group and runs `handler(ctx)` for each job."""

    def __init__(
        self,
        queue: JobQueue,
        kind: KindLike,
        handler: Handler,
        consumer_name: str = "",
        *,
        visibility_timeout_s: float = 30.0,
        max_attempts: int = 3,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        heartbeat_s: Optional[float] = None,
        poll_s: float = 0.5,
        group: str = "workers",
        store_retry_s: float = 300.0,
        on_finished: Optional[Callable[[str, str, float], None]] = None,
    ) -> None:
        self.queue = queue
        self.kind = parse_kind(kind)
        self.kind_name = KIND_NAMES[self.kind]
        self.handler = handler
        self.consumer = consumer_name or default_consumer_name()
        self.config = WorkerConfig(
            visibility_timeout_s=visibility_timeout_s,
            max_attempts=max_attempts,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            heartbeat_s=heartbeat_s,
            poll_s=poll_s,
            group=group,
            store_retry_s=store_retry_s,
        )
        self._client = queue.client
        self._keys = queue.keys
        self._scripts = queue.scripts
        self._stream = self._keys.stream(self.kind_name)
        self._group_ready = False
        self._next_housekeeping = 0.0
        self._reclaim_cursor = b"0-0"
        self._heartbeat = Heartbeat(self._beat, self.config.heartbeat_interval_s)
        # Called with (kind, "succeeded" | "failed" | "cancelled", seconds) after each attempt's outcome is stored (metrics).
        self.on_finished = on_finished

    # -- the loop ------------------------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and handle at most one job (blocking up to poll_s for one); True if an entry was handled."""
        with unavailable_as_error(self.queue.url):
            self._ensure_group()
            claimed = self._claim()
        if claimed is None:
            return False
        self._process(*claimed)
        return True

    def run_forever(self, stop_event: Optional[StopEvent] = None) -> None:
        """Handle jobs until `stop_event` is set (the current job finishes first); rides out Redis outages."""
        stop = stop_event if stop_event is not None else threading.Event()
        delay = self.config.poll_s
        try:
            while not stop.is_set():
                try:
                    self.run_once()
                    delay = self.config.poll_s
                except QueueUnavailable as error:
                    log.warning("%s: %s; trying again in %.1f s", self.consumer, error, delay)
                    stop.wait(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the heartbeat and leave the consumer group if nothing is pending on this consumer."""
        self._heartbeat.stop()
        try:
            with unavailable_as_error(self.queue.url):
                if self._group_ready and not self._client.xpending_range(
                    self._stream, self.config.group, "-", "+", 1, consumername=self.consumer
                ):
                    self._client.xgroup_delconsumer(self._stream, self.config.group, self.consumer)
        except QueueUnavailable as error:
            log.warning("%s: could not leave the consumer group: %s", self.consumer, error)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- claiming ------------------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From id 0, so jobs submitted before the first worker ever started are seen.
            self._client.xgroup_create(self._stream, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    def _claim(self) -> Optional[Claimed]:
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self.config.poll_s
            self._scripts.promote(
                keys=[self._keys.delayed(self.kind_name), self._stream],
                args=[self._keys.job_prefix, _PROMOTE_BATCH],
            )
            reclaimed = self._reclaim()
            if reclaimed is not None:
                self._next_housekeeping = now  # there may be more
                return reclaimed
        try:
            # A busy queue: take and start the next entry in one script. An idle one: block for the next.
            taken = self._scripts.claim(
                keys=[self._stream, self._keys.dead(self.kind_name)],
                args=[self.config.group, self.consumer, self._keys.job_prefix, self.config.max_attempts],
            )
            if taken is not None:
                entry_id, flat, started = taken
                return entry_id, dict(zip(flat[::2], flat[1::2])), started
            reply = self._client.xreadgroup(
                self.config.group, self.consumer, {self._stream: ">"}, count=1, block=int(self.config.poll_s * 1000)
            )
        except redis.ResponseError as error:
            if "NOGROUP" in str(error):  # Redis lost its data (no persistence): make the group again
                self._group_ready = False
                return None
            raise
        if not reply or not reply[0][1]:
            return None
        entry_id, fields = reply[0][1][0]
        return entry_id, fields, None

    def _reclaim(self) -> Optional[Claimed]:
        """An entry pending for longer than the visibility timeout (its worker died), if any."""
        min_idle_ms = int(self.config.visibility_timeout_s * 1000)
        cursor, entries, *_ = self._client.xautoclaim(
            self._stream, self.config.group, self.consumer, min_idle_ms, start_id=self._reclaim_cursor, count=1
        )
        self._reclaim_cursor = cursor
        for entry_id, fields in entries:
            if fields is not None:
                log.info("%s reclaimed entry %s of %s", self.consumer, entry_id.decode(), self._stream)
                return entry_id, fields, None
        return None

    # -- running -------------------------------------------------------------------------------------------

    def _process(self, entry_id: bytes, fields: dict[bytes, bytes], started: Optional[list]) -> None:
        """Handle one claimed entry; `started` is the start script's outcome when the claim already ran it."""
        if started is not None and started[0] not in (b"run", b"unparsed"):
            return  # final, stale, unknown or dead: the script has acked (and if need be dead-lettered) it
        try:
            job = self._parse(fields)
        except ValueError as error:
            log.error("%s dead-lettered entry %s: %s", self.consumer, entry_id.decode(), error)
            reason = str(error)
            self._persist(lambda: self._dead_letter_entry(entry_id, fields, reason), entry_id.decode())
            return
        if started is None:
            started = self._persist(lambda: self._start(job, entry_id), job.id)
        if started is None or started[0] != b"run":
            return
        job.attempt = int(started[1])
        lease = Lease(entry_id=entry_id, job_id=job.id, attempt=job.attempt)
        ctx = JobContext(job, self.consumer, self._progress_sink(job), lease.cancel, lease.lost)
        self._heartbeat.track(lease)
        began = time.monotonic()
        try:
            outcome = self._run_handler(ctx, lease)
        finally:
            self._heartbeat.untrack()
        if self.on_finished is not None:
            try:
                self.on_finished(self.kind_name, outcome, time.monotonic() - began)
            except Exception:  # noqa: BLE001 - a metrics bug must not stop the worker
                log.exception("%s: on_finished failed", self.consumer)

    def _run_handler(self, ctx: JobContext, lease: Lease) -> str:
        try:
            returned = self.handler(ctx)
            outcome = returned if isinstance(returned, JobResult) else JobResult(result=returned or {})
        except JobCancelled as cancelled:
            reason = str(cancelled)
            self._persist(lambda: self._store_cancelled(lease, reason), lease.job_id)
            return "cancelled"
        except Exception as error:  # noqa: BLE001 - any handler error fails this attempt
            log.warning("%s: job %s attempt %d failed", self.consumer, lease.job_id, lease.attempt, exc_info=True)
            message = f"{type(error).__name__}: {error}"
            final = isinstance(error, PermanentJobError)  # no retry can fix it: dead-lettered now
            self._persist(lambda: self._store_failure(lease, message, final=final), lease.job_id)
            return "failed"
        self._persist(lambda: self._store_success(ctx.job, lease, outcome), lease.job_id)
        return "succeeded"

    def _progress_sink(self, job: jobs_pb2.Job) -> Callable[[str, float, dict[str, float]], None]:
        def sink(message: str, fraction: float, metrics: dict[str, float]) -> None:
            try:
                self.queue.progress(job.id, job.attempt, message, fraction, metrics)
            except QueueUnavailable as error:  # progress is best effort; the outcome is not
                log.warning("progress event of job %s lost: %s", job.id, error)

        return sink

    def _parse(self, fields: dict[bytes, bytes]) -> jobs_pb2.Job:
        raw = fields.get(b"job")
        if raw is None:
            names = sorted(name.decode(errors="replace") for name in fields)
            raise ValueError(f"stream entry has no 'job' field (fields: {names})")
        try:
            job = jobs_pb2.Job.FromString(raw)
        except DecodeError as error:
            raise ValueError(f"cannot parse the 'job' field as tinylm.v1.Job: {error}") from error
        if job.kind != self.kind:
            raise ValueError(f"job kind {job.kind} does not belong on {self._stream} (kind {self.kind_name!r})")
        if job.WhichOneof("spec") != self.kind_name:
            raise ValueError(f"job spec is {job.WhichOneof('spec')!r}, expected {self.kind_name!r}")
        if not job.id or fields.get(b"id") != job.id.encode():
            raise ValueError(f"entry id field {fields.get(b'id')!r} does not match the job's id {job.id!r}")
        return job

    # -- storing outcomes (each one atomic script that also acks the entry) ----------------------------------

    def _persist(self, action: Callable[[], Any], what: str) -> Any:
        """Run `action`, retrying through a Redis outage for up to store_retry_s; None if it never got through.

        Giving up leaves the entry pending, so another worker reclaims it later: nothing is lost or acked twice.
        """
        deadline = time.monotonic() + self.config.store_retry_s
        delay = 0.1
        while True:
            try:
                with unavailable_as_error(self.queue.url):
                    return action()
            except QueueUnavailable as error:
                if time.monotonic() >= deadline:
                    log.error("%s gave up storing the outcome of %s: %s", self.consumer, what, error)
                    return None
                log.warning("%s could not store the outcome of %s yet: %s", self.consumer, what, error)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _job_keys(self, job_id: str) -> list[str]:
        return [self._keys.job(job_id), self._keys.events(job_id), self._stream]

    def _start(self, job: jobs_pb2.Job, entry_id: bytes) -> list[bytes]:
        keys = self._job_keys(job.id) + [self._keys.dead(self.kind_name)]
        args = [job.id, entry_id, self.config.group, self.consumer, self.config.max_attempts, job.SerializeToString()]
        return self._scripts.start(keys=keys, args=args)

    def _beat(self, lease: Lease) -> bytes:
        with unavailable_as_error(self.queue.url):
            return self._scripts.heartbeat(
                keys=[self._keys.job(lease.job_id), self._stream],
                args=[lease.entry_id, lease.attempt, self.config.group, self.consumer],
            )

    def _store_success(self, job: jobs_pb2.Job, lease: Lease, outcome: JobResult) -> bytes:
        child_ids = [
            self.queue.submit(kind, spec, idempotency_key=f"{job.id}:next:{index}", parent_id=job.id)
            for index, (kind, spec) in enumerate(outcome.next_jobs)
        ]
        result_json = json.dumps(dict(outcome.result), sort_keys=True, allow_nan=False)
        args = [lease.entry_id, lease.attempt, self.config.group, result_json, " ".join(child_ids)]
        return self._scripts.succeed(keys=self._job_keys(job.id), args=args)

    def _store_failure(self, lease: Lease, message: str, *, final: bool = False) -> bytes:
        keys = self._job_keys(lease.job_id) + [self._keys.dead(self.kind_name), self._keys.delayed(self.kind_name)]
        args = [
            lease.entry_id,
            lease.attempt,
            self.config.group,
            message,
            0 if final else self.config.max_attempts,  # 0: the script dead-letters whatever the attempt
            repr(self.config.backoff_s(lease.attempt)),
            lease.job_id,
        ]
        return self._scripts.fail(keys=keys, args=args)

    def _store_cancelled(self, lease: Lease, message: str) -> bytes:
        args = [lease.entry_id, lease.attempt, self.config.group, message]
        return self._scripts.cancelled(keys=self._job_keys(lease.job_id), args=args)

    def _dead_letter_entry(self, entry_id: bytes, fields: dict[bytes, bytes], error: str) -> bytes:
        job_id = fields.get(b"id", b"").decode(errors="replace")
        keys = [self._keys.dead(self.kind_name), self._stream, self._keys.job(job_id), self._keys.events(job_id)]
        args: list[Union[bytes, str]] = [entry_id, self.config.group, error, job_id]
        for name, value in fields.items():
            args += [name, value]
        return self._scripts.dead_letter_entry(keys=keys, args=args)
