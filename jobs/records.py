"""Decoding what Redis holds (hashes and stream entries, all bytes) into the wire types."""

import json
from dataclasses import dataclass, field
from typing import Optional

from google.protobuf.message import DecodeError

from protos import jobs_pb2

__all__ = ["DeadLetter", "decode_dead_letter", "decode_event", "decode_status", "entry_time"]

Fields = dict[bytes, bytes]


def _text(fields: Fields, name: str, default: str = "") -> str:
    value = fields.get(name.encode())
    return default if value is None else value.decode("utf-8", errors="replace")


def entry_time(entry_id: bytes) -> float:
    """Seconds since the epoch at which Redis wrote a stream entry (its id is '<ms>-<seq>')."""
    return int(entry_id.split(b"-", 1)[0]) / 1000.0


def decode_status(fields: Fields) -> jobs_pb2.JobStatus:
    """A JobStatus from a job hash; `job.attempt` is the number of attempts started so far."""
    job = jobs_pb2.Job.FromString(fields[b"job"])
    job.attempt = int(_text(fields, "attempts", "0"))
    return jobs_pb2.JobStatus(
        job=job,
        state=int(_text(fields, "state", "0")),
        worker=_text(fields, "worker"),
        error=_text(fields, "error"),
        result_json=_text(fields, "result"),
        updated_unix=float(_text(fields, "updated", "0")),
        child_ids=_text(fields, "children").split(),
    )


def decode_event(job_id: str, entry_id: bytes, fields: Fields) -> jobs_pb2.JobEvent:
    """A JobEvent from one entry of a job's events stream."""
    metrics = _text(fields, "metrics")
    return jobs_pb2.JobEvent(
        job_id=job_id,
        event_id=entry_id.decode(),
        time_unix=entry_time(entry_id),
        state=int(_text(fields, "state", "0")),
        message=_text(fields, "message"),
        progress=float(_text(fields, "progress", "-1")),
        metrics=json.loads(metrics) if metrics else {},
        attempt=int(_text(fields, "attempt", "0")),
    )


@dataclass(frozen=True)
class DeadLetter:
    """One entry of a kind's dead-letter stream: the job (None when the entry could not be parsed) and why."""

    entry_id: str
    job_id: str
    error: str
    attempt: int
    time_unix: float
    job: Optional[jobs_pb2.Job] = None
    raw: dict[str, bytes] = field(default_factory=dict)  # the original fields of an unparseable entry


def decode_dead_letter(entry_id: bytes, fields: Fields) -> DeadLetter:
    job: Optional[jobs_pb2.Job] = None
    if b"job" in fields:
        try:
            job = jobs_pb2.Job.FromString(fields[b"job"])
        except DecodeError:
            job = None
    raw = {k.decode()[4:]: v for k, v in fields.items() if k.startswith(b"raw:")}
    return DeadLetter(
        entry_id=entry_id.decode(),
        job_id=_text(fields, "job_id"),
        error=_text(fields, "error"),
        attempt=int(_text(fields, "attempt", "0")),
        time_unix=entry_time(entry_id),
        job=job,
        raw=raw,
    )
