"""Continuous batching: every engine step, admit waiting requests into free KV-cache slots and split the
running set into a prefill batch (just admitted: run their prompts) and a decode batch (one token each).

As in vLLM's scheduler, admission happens between steps, not between batches: a request that arrives
while others are mid-generation starts on the next step, and a finished or cancelled one gives its slot
back at once. The waiting queue is bounded (requests that a free slot will take at the next step do not
count); a full queue refuses new work (`QueueFull`) rather than letting latency grow without limit.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Container

from inference_svc.kv_pool import KVPool
from inference_svc.sequence import Sequence, SequenceStatus
from model.field_checks import check_int

__all__ = ["DuplicateRequest", "QueueFull", "Scheduler", "SchedulerOutput", "check_new_ids", "check_room"]


class QueueFull(RuntimeError):
    """The waiting queue is at `max_queue`; the caller should retry later (gRPC: RESOURCE_EXHAUSTED)."""


class DuplicateRequest(ValueError):
    """A request_id already in flight, or repeated within one batch; `index` is its place in the batch."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self):  # pickled with its index (an engine process sends it to the caller)
        return DuplicateRequest, (str(self), self.index)


def check_new_ids(ids: list[str], in_flight: "Container[str]") -> None:
    """DuplicateRequest for the first id already in flight or repeated among `ids`."""
    seen: set[str] = set()
    for i, rid in enumerate(ids):
        if rid in in_flight:
            raise DuplicateRequest(f"request_id {rid!r} is already in flight", i)
        if rid in seen:
            raise DuplicateRequest(f"request_id {rid!r} appears more than once in the batch", i)
        seen.add(rid)


def check_room(n: int, waiting: int, n_free: int, max_queue: int) -> None:
    """QueueFull unless `n` new requests fit: a free slot each, or a place among `max_queue` waiting. Only requests
    that will still wait count against the bound: one that can take a free slot at the next step is never refused
    (max_queue 0 = no waiting, not no work)."""
    if waiting + n > max_queue + n_free:
        raise QueueFull(
            f"the waiting queue is full ({max_queue} requests) and no slot is free; retry later"
            if n == 1
            else f"{n} requests do not fit: {n_free} free slots, {waiting} of {max_queue} queue places taken; "
            "retry later or send fewer"
        )


@dataclass
class SchedulerOutput:
    """What one engine step runs."""

    prefill: list[Sequence] = field(default_factory=list)  # admitted this step: prompt -> first token
    decode: list[Sequence] = field(default_factory=list)  # prefilled earlier: last token -> next token
    aborted: list[Sequence] = field(default_factory=list)  # cancelled since the last step; slots already freed

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.aborted)


class Scheduler:
    """FIFO admission into a `KVPool`. Thread-safe: `add`/`abort` come from caller threads, the rest from
    the engine thread.

    `max_prefill_tokens` caps the prompt tokens admitted in one step (at least one request is always
    admitted), so a burst of long prompts cannot stall the decode of running requests for long.
    """

    def __init__(self, pool: KVPool, max_queue: int, max_prefill_tokens: int = 8192) -> None:
        check_int("max_queue", max_queue, 0)
        check_int("max_prefill_tokens", max_prefill_tokens, 1)
        self.pool = pool
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; QueueFull when every free slot is spoken for and `max_queue` more are already
        waiting, ValueError on a duplicate id."""
        self.add_many([seq])

    def add_many(self, seqs: list[Sequence]) -> None:
        """Queue several sequences at once, all or none: QueueFull when they would not all fit (a free slot each,
        or a place among `max_queue` waiting), ValueError on an id in flight or repeated among them."""
        with self._lock:
            check_new_ids([seq.request_id for seq in seqs], self._by_id)
            check_room(len(seqs), len(self._waiting), self.pool.n_free, self.max_queue)
            self._waiting.extend(seqs)
            for seq in seqs:
                self._by_id[seq.request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Mark a request cancelled; the next `schedule()` frees it. False when no such request is in flight."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is None:
                return False
            seq.cancelled = True
            return True

    def schedule(self) -> SchedulerOutput:
        """Free cancelled sequences, admit waiting ones into free slots, and say what this step runs."""
        out = SchedulerOutput()
        with self._lock:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._retire(seq)
                out.aborted.append(seq)
            for seq in [s for s in self._running if s.cancelled]:
                self._running.remove(seq)
                self._retire(seq)
                out.aborted.append(seq)
            out.decode = list(self._running)
            budget = self.max_prefill_tokens
            while self._waiting and (not out.prefill or self._waiting[0].prompt_len <= budget):
                slot = self.pool.allocate()
                if slot is None:
                    break
                seq = self._waiting.popleft()
                seq.slot, seq.status = slot, SequenceStatus.RUNNING
                budget -= seq.prompt_len
                self._running.append(seq)
                out.prefill.append(seq)
        return out

    def finish(self, seq: Sequence) -> None:
        """A running sequence is done (length, stop or error): give its slot back now."""
        with self._lock:
            if seq.status is SequenceStatus.FINISHED:
                return
            if seq in self._running:
                self._running.remove(seq)
            elif seq in self._waiting:
                self._waiting.remove(seq)
            self._retire(seq)

    def drain(self) -> list[Sequence]:
        """Remove every waiting and running sequence (shutdown), freeing their slots; returns them."""
        with self._lock:
            seqs = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
            for seq in seqs:
                self._retire(seq)
        return seqs

    def _retire(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.pool.free(seq.slot)
        seq.status = SequenceStatus.FINISHED
        self._by_id.pop(seq.request_id, None)
