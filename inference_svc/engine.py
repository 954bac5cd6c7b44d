"""The serving engine: a background loop that runs continuous batching over a model runner.

`submit(request)` queues a request and returns a `RequestHandle` whose iterator yields `Chunk`s as tokens
come: token ids and their text, then a final chunk with the finish reason, token counts and timings.
Each loop step the scheduler frees cancelled sequences, admits waiting ones into free slots, the runner
prefills the new ones and decodes one token for the rest, and the sampler picks the next tokens with a
single host sync per step (vLLM's LLMEngine.step, in one thread).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple

from inference_svc.detokenizer import StreamingDetokenizer
from inference_svc.kv_pool import KVPool
from inference_svc.params import Request
from inference_svc.runner import ModelRunner
from inference_svc.sampler import Sampler
from inference_svc.scheduler import QueueFull, Scheduler
from inference_svc.sequence import Sequence, SequenceStatus
from inference_svc.speculative import SpeculativeDecoder
from model.field_checks import check_int
from model.tokenizers import Tokenizer

__all__ = ["Chunk", "Engine", "EngineStats", "FinishReason", "QueueFull", "RequestHandle", "Timings", "Usage"]

log = logging.getLogger(__name__)


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens or the context length reached
    STOP = "stop"  # a stop sequence was generated
    CANCELLED = "cancelled"  # the caller cancelled or went away, or the engine shut down
    ERROR = "error"  # the runner or sampler failed; `Chunk.error` says why


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Milliseconds, measured from the request's arrival at `submit`."""

    ttft_ms: float  # to the first generated token (0 when none was generated)
    mean_inter_token_ms: float  # mean gap between generated tokens after the first
    total_ms: float  # to the final chunk
    queue_ms: float  # waiting for a slot
    token_ms: tuple[float, ...]  # arrival of each generated token


class Chunk(NamedTuple):
    """A piece of a streamed generation; the last one has `finish_reason` set (and may carry tokens too).
    A NamedTuple: the engine makes one per token per request, so construction cost matters."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: str = ""

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """Occupancy, for load reports and leak tests (idle engine: free_slots == max_slots, the rest 0)."""

    max_slots: int
    free_slots: int
    queued: int
    running: int
    in_flight: int  # handles not yet given their final chunk
    finished: dict[str, int]  # requests ended so far, by finish reason ("length", "stop", "cancelled", "error")
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed and accepted so far
    draft_accepted: int = 0


class RequestHandle:
    """A submitted request: iterate it for its chunks (ends after the final one), or `result()`."""

    def __init__(self, engine: "Engine", request_id: str, sink: "queue.SimpleQueue[Chunk]") -> None:
        self.engine = engine
        self.request_id = request_id
        self._sink = sink
        self._done = False

    def next_chunk(self, timeout: float | None = None) -> Chunk | None:
        """The next chunk, or None if none came within `timeout` seconds (or the stream already ended)."""
        if self._done:
            return None
        try:
            chunk = self._sink.get(timeout=timeout)
        except queue.Empty:
            return None
        self._done = chunk.final
        return chunk

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self.next_chunk()) is not None:
            yield chunk

    def cancel(self) -> bool:
        return self.engine.cancel(self.request_id)

    def result(self) -> Chunk:
        """Wait for the end; one chunk holding every token id, the whole text and the final fields."""
        ids: list[int] = []
        text: list[str] = []
        for chunk in self:
            ids.extend(chunk.token_ids)
            text.append(chunk.text)
        return chunk._replace(token_ids=tuple(ids), text="".join(text))


class Engine:
    """Continuous batching over `runner` with up to `max_slots` running and `max_queue` waiting requests.

    The loop thread starts at construction; `close()` (or leaving a `with` block) stops it and cancels
    whatever is still in flight. With a `draft` runner (a smaller model with the same tokenizer), decode steps
    are speculative: the draft proposes `speculative_k` tokens per sequence and the target verifies them in one
    step (inference_svc.speculative); the output keeps the target's distribution.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        max_slots: int | None = None,
        max_queue: int = 1024,
        *,
        max_prefill_tokens: int = 8192,
        draft: ModelRunner | None = None,
        speculative_k: int = 4,
    ) -> None:
        max_slots = runner.n_slots if max_slots is None else max_slots
        check_int("max_slots", max_slots, 1, runner.n_slots, note=" (the runner's slots)")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_slots = max_slots
        self.scheduler = Scheduler(KVPool(max_slots), max_queue, max_prefill_tokens)
        self.sampler = Sampler(runner.device, vocab_size=tokenizer.vocab_size)
        self.speculative = (
            SpeculativeDecoder(runner, draft, speculative_k, vocab_size=tokenizer.vocab_size, max_slots=max_slots)
            if draft is not None else None
        )  # fmt: skip
        self._wake = threading.Condition()
        self._closing = False
        self._sinks: dict[str, queue.SimpleQueue[Chunk]] = {}
        self._finished = {reason.value: 0 for reason in FinishReason}
        # Called on the engine thread with every final chunk, before its caller sees it (metrics); keep them cheap.
        self.finish_listeners: list[Callable[[Chunk], None]] = []
        self._thread = threading.Thread(target=self._loop, name="tinylm-engine", daemon=True)
        self._thread.start()

    # Caller side --------------------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request (a fresh request_id is made when empty). Raises QueueFull when the waiting
        queue is full, ValueError on a request_id already in flight or a prompt beyond the runner's context,
        RuntimeError once the engine is closed."""
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)
        if len(request.prompt_ids) > self.runner.max_len:
            raise ValueError(
                f"prompt: {len(request.prompt_ids)} tokens exceed the context length {self.runner.max_len}"
            )
        sink: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        seq = Sequence(
            request=request,
            detokenizer=StreamingDetokenizer(self.tokenizer, request.params.stop),
            generator=self.sampler.generator(request.params.seed),
            sink=sink,
        )
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self.scheduler.add(seq)  # QueueFull / duplicate id: nothing was registered
            self._sinks[request.request_id] = sink
            self._wake.notify()
        return RequestHandle(self, request.request_id, sink)

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; its slot is freed and its final chunk (CANCELLED) sent by
        the next engine step. False when it is not in flight (finished already, or unknown)."""
        with self._wake:
            found = self.scheduler.abort(request_id)
            self._wake.notify()
        return found

    def stats(self) -> EngineStats:
        with self._wake:
            return EngineStats(
                max_slots=self.max_slots,
                free_slots=self.scheduler.pool.n_free,
                queued=self.scheduler.n_waiting,
                running=self.scheduler.n_running,
                in_flight=len(self._sinks),
                finished=dict(self._finished),
                draft_proposed=self.speculative.stats.proposed if self.speculative else 0,
                draft_accepted=self.speculative.stats.accepted if self.speculative else 0,
            )

    def close(self) -> None:
        """Stop the loop; requests still in flight end CANCELLED."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Engine thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self.scheduler.has_work():
                    self._wake.wait()
                if self._closing:
                    break
            try:
                self.step()
            except Exception:  # a bookkeeping bug must not silently stop the server's only loop
                log.exception("engine step failed")
        for seq in self.scheduler.drain():
            self._finish(seq, FinishReason.CANCELLED, error="the engine shut down")

    def step(self) -> None:
        """One iteration: free cancelled, admit, prefill the admitted, decode the rest, stream tokens."""
        out = self.scheduler.schedule()
        for seq in out.aborted:
            self._finish(seq, FinishReason.CANCELLED)
        if out.prefill:
            self._run(out.prefill, prefill=True)
        decode, rounds = out.decode, []
        if self.speculative is not None:  # sequences near the end of a context stay on plain steps
            decode, rounds = [], []
            for seq in out.decode:
                (rounds if self.speculative.eligible(seq) else decode).append(seq)
        if rounds:
            self._run(rounds, speculative=True)
        if decode:
            self._run(decode)

    def _run(self, seqs: list[Sequence], *, prefill: bool = False, speculative: bool = False) -> None:
        """Prefill the admitted, decode one token each, or run a speculative round (1..k+1 tokens each); stream
        the new tokens."""
        slots = [seq.slot for seq in seqs]
        try:
            if speculative:
                new_tokens = self.speculative.step(seqs)
            else:
                if prefill:
                    for seq in seqs:
                        seq.admitted_at = time.perf_counter()
                    logits = self.runner.prefill(slots, [seq.request.prompt_ids for seq in seqs])  # (B, V)
                else:
                    tokens = [seq.last_token for seq in seqs]
                    logits = self.runner.decode(slots, tokens, [seq.length - 1 for seq in seqs])  # (B, V)
                new_tokens = [[token] for token in self.sampler.sample(logits, seqs)]
        except Exception as err:  # a failed step fails its requests, not the server
            if len(seqs) > 1:  # one bad request must not fail the rest: run each alone to find it
                log.warning("engine step failed for %d sequences (%s); retrying each alone", len(seqs), err)
                for seq in seqs:
                    self._run([seq], prefill=prefill, speculative=speculative)
                return
            log.exception("request %s failed", seqs[0].request_id)
            self._finish(seqs[0], FinishReason.ERROR, error=f"{type(err).__name__}: {err}")
            return
        now = time.perf_counter()
        for seq, tokens in zip(seqs, new_tokens):
            try:
                for token in tokens:  # streamed one by one; a stop string or the length limit ends it early
                    self._append(seq, token, now)
                    if seq.status is SequenceStatus.FINISHED:
                        break
            except Exception as err:  # e.g. the tokenizer refusing a token: fail this request only
                log.exception("request %s failed on token %d", seq.request_id, token)
                self._finish(seq, FinishReason.ERROR, error=f"{type(err).__name__}: {err}")

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        """Record one generated token, stream it, and end the sequence if it is done (hot: once per token)."""
        out = seq.output_ids
        out.append(token)
        seq.token_times.append(now)
        length = seq.prompt_len + len(out)
        seq.n_cached = length - 1  # the new token's K/V are written when it is fed back
        detok = seq.detokenizer
        text = detok.add((token,))
        if detok.stopped:
            self._finish(seq, FinishReason.STOP, token_ids=(token,), text=text)
        elif len(out) >= seq.request.params.max_new_tokens or length > self.runner.max_len:
            # Context full: the next token would need a cache position at max_len.
            self._finish(seq, FinishReason.LENGTH, token_ids=(token,), text=text + detok.flush())
        else:
            seq.sink.put(Chunk(seq.request.request_id, (token,), text))

    def _finish(
        self, seq: Sequence, reason: FinishReason, *, token_ids: tuple[int, ...] = (), text: str = "", error: str = ""
    ) -> None:
        """Give the slot back, then send the final chunk."""
        slot = seq.slot
        self.scheduler.finish(seq)
        if slot is not None:
            self.runner.release(slot)
            if self.speculative is not None:
                self.speculative.draft.release(slot)
        end = time.perf_counter()
        with self._wake:
            self._sinks.pop(seq.request_id, None)
            self._finished[reason.value] += 1
        final = Chunk(
            seq.request_id,
            token_ids,
            text,
            finish_reason=reason,
            usage=Usage(seq.prompt_len, len(seq.output_ids)),
            timings=_timings(seq, end),
            error=error,
        )
        for listener in self.finish_listeners:
            try:
                listener(final)
            except Exception:  # a metrics bug must not keep a caller from its final chunk
                log.exception("finish listener failed")
        seq.sink.put(final)


def _timings(seq: Sequence, end: float) -> Timings:
    ms = lambda t: (t - seq.arrived_at) * 1e3  # noqa: E731
    times = seq.token_times
    return Timings(
        ttft_ms=ms(times[0]) if times else 0.0,
        mean_inter_token_ms=(times[-1] - times[0]) * 1e3 / (len(times) - 1) if len(times) > 1 else 0.0,
        total_ms=ms(end),
        queue_ms=ms(seq.admitted_at if seq.admitted_at is not None else end),
        token_ms=tuple(ms(t) for t in times),
    )
