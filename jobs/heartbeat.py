"""A worker's heartbeat: a thread that keeps the current job's lease alive and hears about cancels.

Each beat resets the stream entry's idle time (XCLAIM to itself), so XAUTOCLAIM elsewhere leaves it
alone while this worker lives; a worker that dies stops beating and its job is reclaimed after the
visibility timeout. The beat's answer sets the lease's `cancel` (a caller cancelled) or `lost` (another
worker took the job, or it is final) flag, which the handler sees through `JobContext.cancelled()`.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from jobs.errors import QueueUnavailable

__all__ = ["Heartbeat", "Lease"]

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """One attempt that a worker holds: the stream entry, the job and the flags its heartbeat sets."""

    entry_id: bytes
    job_id: str
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)


class Heartbeat:
    """Beats every `interval_s` for the lease being tracked (if any); `beat` returns 'ok', 'cancel' or 'lost'."""

    def __init__(self, beat: Callable[[Lease], bytes], interval_s: float) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._lease: Optional[Lease] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def track(self, lease: Lease) -> None:
        with self._lock:
            self._lease = lease
            if self._thread is None:  # first use, or reuse after stop()
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name="jobs-heartbeat", daemon=True
                )
                self._thread.start()

    def untrack(self) -> None:
        with self._lock:
            self._lease = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval_s):
            with self._lock:
                lease = self._lease
            if lease is None:
                continue
            try:
                answer = self._beat(lease)
            except QueueUnavailable as error:
                log.warning("heartbeat of job %s failed: %s", lease.job_id, error)
                continue
            if answer == b"cancel":
                lease.cancel.set()
            elif answer == b"lost":
                lease.lost.set()
