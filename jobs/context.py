"""What a handler sees of its job (JobContext) and what it may hand back (JobResult)."""

import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from google.protobuf.message import Message

from jobs.errors import JobCancelled
from jobs.kinds import KindLike, parse_kind, spec_type
from protos import jobs_pb2

__all__ = ["JobContext", "JobResult"]

ProgressSink = Callable[[str, float, dict[str, float]], None]


class JobContext:
    """One attempt of one job, as its handler sees it: the job, progress reporting and cancellation."""

    def __init__(
        self,
        job: jobs_pb2.Job,
        worker: str,
        progress_sink: ProgressSink,
        cancel_requested: threading.Event,
        lease_lost: threading.Event,
    ) -> None:
        self.job = job
        self.worker = worker
        self._progress_sink = progress_sink
        self._cancel_requested = cancel_requested
        self._lease_lost = lease_lost

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self.job.attempt

    @property
    def spec(self) -> Message:
        """The job's spec (TrainSpec, ExportSpec, BenchSpec or NoopSpec)."""
        return getattr(self.job, self.job.WhichOneof("spec"))

    def progress(self, message: str, fraction: Optional[float] = None, **metrics: float) -> None:
        """Publish a progress event: a human line, the fraction done in [0, 1] (None: unknown), and numbers."""
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1] or None, got {fraction}")
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")
        self._progress_sink(message, -1.0 if fraction is None else float(fraction), dict(metrics))

    def cancelled(self) -> bool:
        """True when the job should stop: a caller cancelled it, or another worker took it over."""
        return self._cancel_requested.is_set() or self._lease_lost.is_set()

    def check_cancelled(self) -> None:
        """Raise JobCancelled when `cancelled()`; call it between steps of long work."""
        if self._cancel_requested.is_set():
            raise JobCancelled(f"job {self.job.id} was cancelled")
        if self._lease_lost.is_set():
            raise JobCancelled(f"job {self.job.id} attempt {self.attempt} lost its lease to another worker")


@dataclass(frozen=True)
class JobResult:
    """A handler's result (a JSON object) and the jobs to enqueue after it succeeds (a pipeline's next steps).

    Each next job is (kind, spec); it is submitted with parent_id set and an idempotency key derived from
    the parent's id, so a retried parent never enqueues it twice.
    """

    result: Mapping[str, Any] = field(default_factory=dict)
    next_jobs: Sequence[tuple[KindLike, Message]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.result, Mapping):
            raise TypeError(f"result must be a mapping (a JSON object), got {type(self.result).__name__}")
        json.dumps(dict(self.result), allow_nan=False)  # fail at the handler, not at the store
        for kind, spec in self.next_jobs:
            expected = spec_type(parse_kind(kind))
            if not isinstance(spec, expected):
                raise ValueError(
                    f"next job spec for kind {kind!r} must be {expected.__name__}, got {type(spec).__name__}"
                )
        object.__setattr__(self, "next_jobs", tuple(self.next_jobs))
