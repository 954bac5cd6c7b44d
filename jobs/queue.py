"""The caller's side of the job queue: submit, look up, list, cancel, watch, and revive dead letters.

Workers take jobs off the same streams (jobs/worker.py); everything both sides change goes through the
atomic scripts in jobs/scripts.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Optional, Union

import redis
from google.protobuf.message import Message

from jobs.connection import ConnectionConfig, connect, unavailable_as_error
from jobs.errors import JobNotFound
from jobs.keys import KeySpace
from jobs.kinds import FINAL_STATES, KIND_NAMES, KindLike, StateLike, kind_name, parse_kind, parse_state, spec_type
from jobs.records import DeadLetter, decode_dead_letter, decode_event, decode_status
from jobs.scripts import MAX_EVENTS, Scripts
from protos import jobs_pb2

__all__ = ["JobQueue"]

_WATCH_BLOCK_MS = 1000  # longest single XREAD block; a watch re-checks its deadline between blocks
_LIST_BATCH = 500  # job hashes fetched per pipeline when listing


class JobQueue:
    """A handle on the queue in one Redis: give it a URL ('redis://127.0.0.1:6379/0') or a client."""

    def __init__(
        self,
        redis_target: Union[str, redis.Redis],
        *,
        prefix: str = "tinylm",
        connection: ConnectionConfig = ConnectionConfig(),
    ) -> None:
        self.client, self.url = connect(redis_target, connection)
        self.keys = KeySpace(prefix)
        self.scripts = Scripts(self.client)

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()

    def __enter__(self) -> "JobQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        kind: KindLike,
        spec: Optional[Message] = None,
        idempotency_key: str = "",
        parent_id: str = "",
    ) -> str:
        """Enqueue a job and return its id; a second submit with the same key (per kind) returns the first id."""
        kind_value = parse_kind(kind)
        name = KIND_NAMES[kind_value]
        expected = spec_type(kind_value)
        spec = expected() if spec is None else spec
        if not isinstance(spec, expected):
            raise ValueError(f"spec for kind {name!r} must be tinylm.v1.{expected.__name__}, got {type(spec).__name__}")
        job_id = uuid.uuid4().hex
        job = jobs_pb2.Job(
            id=job_id,
            kind=kind_value,
            idempotency_key=idempotency_key,
            parent_id=parent_id,
            created_unix=time.time(),
        )
        getattr(job, name).CopyFrom(spec)
        keys = [
            self.keys.job(job_id),
            self.keys.events(job_id),
            self.keys.stream(name),
            self.keys.index(name),
            self.keys.idempotency(name, idempotency_key),
        ]
        args = [job_id, job.SerializeToString(), name, "1" if idempotency_key else "0"]
        with unavailable_as_error(self.url):
            return self.scripts.submit(keys=keys, args=args).decode()

    def get(self, job_id: str) -> jobs_pb2.JobStatus:
        """The job's current status; JobNotFound if no such job."""
        with unavailable_as_error(self.url):
            fields = self.client.hgetall(self.keys.job(job_id))
        if not fields:
            raise JobNotFound(f"no job with id {job_id!r}")
        return decode_status(fields)

    def list(
        self, kind: Optional[KindLike] = None, state: Optional[StateLike] = None, limit: int = 100
    ) -> list[jobs_pb2.JobStatus]:
        """Jobs newest first, optionally of one kind and in one state, at most `limit` of them."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        names = list(KIND_NAMES.values()) if kind is None else [kind_name(kind)]
        wanted = None if state is None else parse_state(state)
        with unavailable_as_error(self.url):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.zrange(self.keys.index(name), 0, -1, withscores=True)
            scored = sorted((pair for ids in pipe.execute() for pair in ids), key=lambda p: p[1], reverse=True)
            found: list[jobs_pb2.JobStatus] = []
            for start in range(0, len(scored), _LIST_BATCH):
                pipe = self.client.pipeline(transaction=False)
                for job_id, _ in scored[start : start + _LIST_BATCH]:
                    pipe.hgetall(self.keys.job(job_id.decode()))
                for fields in pipe.execute():
                    if fields and (wanted is None or int(fields[b"state"]) == wanted):
                        found.append(decode_status(fields))
                        if len(found) == limit:
                            return found
        return found

    def cancel(self, job_id: str) -> jobs_pb2.JobStatus:
        """Cancel a job: a queued one never runs; a running one is told and stops at its next check.

        Returns the status after the call (a running job stays RUNNING until its handler stops).
        """
        status = self.get(job_id)
        name = KIND_NAMES[status.job.kind]
        keys = [self.keys.job(job_id), self.keys.events(job_id), self.keys.delayed(name)]
        with unavailable_as_error(self.url):
            outcome = self.scripts.cancel(keys=keys, args=[job_id])
        if outcome == b"missing":
            raise JobNotFound(f"no job with id {job_id!r}")
        return self.get(job_id)

    def progress(
        self,
        job_id: str,
        attempt: int,
        message: str,
        fraction: float = -1.0,
        metrics: Optional[Mapping[str, float]] = None,
    ) -> None:
        """Append a RUNNING progress event to the job's events stream (workers call this through JobContext)."""
        fields = {
            "state": jobs_pb2.JOB_STATE_RUNNING,
            "message": message,
            "progress": repr(float(fraction)),
            "metrics": json.dumps({k: float(v) for k, v in (metrics or {}).items()}),
            "attempt": attempt,
        }
        with unavailable_as_error(self.url):
            self.client.xadd(self.keys.events(job_id), fields, maxlen=MAX_EVENTS, approximate=True)

    def watch(self, job_id: str, timeout: Optional[float] = None) -> Iterator[jobs_pb2.JobEvent]:
        """The job's events from the first, blocking for new ones; ends after an event with a final state.

        Raises JobNotFound at once for an unknown job, and TimeoutError when `timeout` seconds pass first.
        """
        self.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._tail(job_id, deadline)

    def _tail(self, job_id: str, deadline: Optional[float]) -> Iterator[jobs_pb2.JobEvent]:
        key = self.keys.events(job_id)
        last = b"0-0"
        while True:
            block = _WATCH_BLOCK_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} did not finish within the watch timeout")
                block = max(1, min(block, int(left * 1000)))
            with unavailable_as_error(self.url):
                reply = self.client.xread({key: last}, count=100, block=block)
                if not reply:
                    # No event for a while: if the job is final but its events are gone (trimmed), say so once.
                    status = self.get(job_id)
                    if status.state in FINAL_STATES and not self.client.xread({key: last}, count=1):
                        yield _closing_event(status)
                        return
                    continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                event = decode_event(job_id, entry_id, fields)
                yield event
                if event.state in FINAL_STATES:
                    return

    def dead_letters(self, kind: KindLike) -> list[DeadLetter]:
        """The kind's dead-letter stream, oldest first."""
        with unavailable_as_error(self.url):
            entries = self.client.xrange(self.keys.dead(kind_name(kind)))
        return [decode_dead_letter(entry_id, fields) for entry_id, fields in entries]

    def retry_dead(self, kind: KindLike, job_id: Optional[str] = None) -> list[str]:
        """Requeue the kind's failed jobs (or just `job_id`) from the dead letters, with a fresh attempt budget.

        Returns the requeued ids. Entries that are not a failed job (unparseable ones) stay where they are.
        """
        name = kind_name(kind)
        if job_id is not None:
            self.get(job_id)
        requeued = []
        for letter in self.dead_letters(name):
            if not letter.job_id or (job_id is not None and letter.job_id != job_id):
                continue
            keys = [
                self.keys.dead(name),
                self.keys.stream(name),
                self.keys.job(letter.job_id),
                self.keys.events(letter.job_id),
            ]
            with unavailable_as_error(self.url):
                if self.scripts.requeue(keys=keys, args=[letter.entry_id, letter.job_id]) == b"requeued":
                    requeued.append(letter.job_id)
        return requeued


def _closing_event(status: jobs_pb2.JobStatus) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(
        job_id=status.job.id,
        time_unix=status.updated_unix,
        state=status.state,
        message=status.error or "finished",
        progress=-1.0,
        attempt=status.job.attempt,
    )
