"""`InferenceService` (protos/inference.proto): the gRPC face of one `Engine` serving one model.

Validation and translation only: a request becomes an `inference_svc.params.Request` (bad fields ->
INVALID_ARGUMENT naming them), the engine does the work, chunks go back as they come. A full queue is
RESOURCE_EXHAUSTED; a model other than the served one is NOT_FOUND; a caller that cancels, disconnects or
runs past its deadline has its request cancelled (its KV-cache slot is free by the next engine step).
`InferenceService` serves on a threaded `grpc.server` (a thread per call); `AsyncInferenceService`, the same service
on a grpc.aio server (`./tinylm serve`'s default), serves every stream from the one event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import grpc

from inference_svc.engine import Chunk, Engine, FinishReason, QueueFull, RequestHandle
from inference_svc.scheduler import DuplicateRequest
from inference_svc.params import Request, RequestError, request_from_proto
from protos import common_pb2, inference_pb2, inference_pb2_grpc
from rpc import errors

__all__ = ["AsyncInferenceService", "InferenceService", "ServedModel", "SERVICE_NAME", "MAX_BATCH"]

log = logging.getLogger(__name__)

SERVICE_NAME = "tinylm.v1.InferenceService"
MAX_BATCH = 1024
MIN_ID_PREFIX = 6
_POLL_S = 0.1  # how often a streaming call checks that its caller is still there
# The server's budget of stream messages per second, shared by its open streams: a stream's messages after its first
# are at least (open streams / budget) apart, at most STREAM_INTERVAL_MAX_S, and the tokens made meanwhile go in one
# message. Every message costs the engine's process GIL time: a server thread's wake-up (threaded server), or gRPC's
# write, whose sendmsg runs holding the GIL (grpc.aio, grpc/grpc#42288). One per token at 64 streams held the engine
# to ~2.3 ms per step on the H200 (14k tokens/s); tools.grpc_probe at 64 streams (aio): 2000/s gave ~1.5x the tokens/s
# of 4000/s. A lone stream still gets a message per token or two; the first token of a stream is never held (TTFT),
# and AsyncInferenceService never holds a final chunk (the threaded servicer may, for up to the interval).
STREAM_MESSAGES_PER_S = 2000.0
STREAM_INTERVAL_MAX_S = 0.1
# AsyncInferenceService: how often its one pump looks at every open stream's queue (a stream's first token and its
# final chunk wait at most this long; the tokens between go out under the budget above, paced: see _StreamPump).
PUMP_TICK_S = 0.001
PACE_BURST_S = 0.005  # the pump's allowance of messages banks at most this long a share of the budget
STREAM_HOLD_MAX_S = 0.2  # tokens are never held longer, whatever the allowance

_FINISH = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}
# Exported files that ListModels reports as formats.
_FORMAT_FILES = {
    "onnx-fp32": "onnx/model.onnx",
    "onnx-fp16": "onnx/model-fp16.onnx",
    "onnx-int8": "onnx/model-int8.onnx",
    "onnx-int4": "onnx/model-int4.onnx",
    "coreml": "coreml",
    "hf": "hf",
}


@dataclass(frozen=True)
class ServedModel:
    """What ListModels says about the served artifact (from its manifest)."""

    id: str
    name: str = ""
    path: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_proto(self) -> common_pb2.ModelInfo:
        m = self.manifest
        created = m.get("created_at", "")
        metrics = {k: float(v) for k, v in (m.get("metrics") or {}).items() if isinstance(v, (int, float))}
        path = self.path.resolve() if self.path else None
        return common_pb2.ModelInfo(
            id=self.id,
            name=self.name,
            preset=str(m.get("preset", "")),
            n_params=int(m.get("num_params", 0)),
            parent_id=m.get("parent_id") or "",
            path=str(path or ""),
            created_unix=datetime.fromisoformat(created).timestamp() if created else 0.0,
            formats=[f for f, rel in _FORMAT_FILES.items() if path and (path / rel).exists()],
            metrics=metrics,
        )


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    """Serves `engine`'s model, described by `model`."""

    def __init__(self, engine: Engine, model: ServedModel, messages_per_s: float = STREAM_MESSAGES_PER_S) -> None:
        if not messages_per_s > 0:
            raise ValueError(f"messages_per_s must be > 0 (inf: a message per token), got {messages_per_s!r}")
        self.engine = engine
        self.model = model
        self.messages_per_s = messages_per_s
        self._streams = 0  # open Generate streams (the interval between a stream's messages scales with them)
        self._streams_lock = threading.Lock()
        self.tokenizer = engine.tokenizer
        self.context_len = engine.runner.max_len

    # RPCs ---------------------------------------------------------------------------------------------

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        self._check_model(request.model, context, "model")
        (handle,) = self._submit([self._request(request, context, "")], context, "")
        if not context.add_callback(handle.cancel):  # the call already ended (cancelled, deadline)
            handle.cancel()
        with self._streams_lock:
            self._streams += 1
        try:
            sent = False
            while True:
                # The first chunk goes alone, as the asyncio pump sends it (never held for the ones behind it).
                chunk = _next_merged(handle, _POLL_S) if sent else handle.next_chunk(_POLL_S)
                if chunk is None:
                    if not context.is_active():
                        handle.cancel()
                        return
                    continue
                yield _response(chunk)
                sent = True
                if chunk.final:
                    return
                # Let tokens gather for this stream's share of the message budget (the first went at once).
                time.sleep(min(self._streams / self.messages_per_s, STREAM_INTERVAL_MAX_S))
        finally:
            with self._streams_lock:
                self._streams -= 1

    def GenerateBatch(
        self, request: inference_pb2.GenerateBatchRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateBatchResponse:
        handles: list[RequestHandle] = []
        context.add_callback(lambda: [h.cancel() for h in handles])
        return self._batch_submit(request, context, handles)()

    def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        models = [self.model.to_proto()] if self.model.name.startswith(request.name_prefix) else []
        return common_pb2.ListModelsResponse(models=models)

    def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        self._check_model(request.model, context, "model")
        try:
            ids = self.tokenizer.encode(request.text)
        except ValueError as err:
            errors.invalid_argument(context, "text", str(err))
        pieces = [self.tokenizer.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids]
        return inference_pb2.TokenizeResponse(token_ids=ids, pieces=pieces)

    # Helpers ------------------------------------------------------------------------------------------

    def _batch_submit(
        self, request: inference_pb2.GenerateBatchRequest, context: Any, handles: list[RequestHandle]
    ) -> Callable[[], inference_pb2.GenerateBatchResponse]:
        """Validate and submit a batch (all or none, admitted in one step), its handles put in `handles`; returns
        the wait for its reply (blocking)."""
        n = len(request.requests)
        if not 1 <= n <= MAX_BATCH:
            errors.invalid_argument(context, "requests", f"must hold 1 to {MAX_BATCH} requests, got {n}")
        reqs = []
        for i, r in enumerate(request.requests):
            self._check_model(r.model, context, f"requests[{i}].model")
            reqs.append(self._request(r, context, f"requests[{i}]."))
        handles.extend(self._submit(reqs, context, "requests[{}]."))
        return lambda: inference_pb2.GenerateBatchResponse(results=[_result(h.result()) for h in handles])

    def _check_model(self, ref: common_pb2.ModelRef, context: grpc.ServicerContext, field_name: str) -> None:
        """An empty ref means the served model; anything else must name it: an id prefix of at least 6
        characters, or the name (in `name`, or in `id` as clients that take "id or name" send it)."""
        if ref.id:
            if ref.id == self.model.name or (len(ref.id) >= MIN_ID_PREFIX and self.model.id.startswith(ref.id)):
                return
            if len(ref.id) < MIN_ID_PREFIX:
                errors.invalid_argument(
                    context, f"{field_name}.id", f"must be at least {MIN_ID_PREFIX} hex characters, got {ref.id!r}"
                )
            errors.not_found(
                context, f"model {ref.id!r} not found; this server serves {self.model.id} ({self.model.name})"
            )
        elif ref.name and ref.name != self.model.name:
            errors.not_found(
                context, f"model named {ref.name!r} not found; this server serves {self.model.name!r} ({self.model.id})"
            )

    def _request(self, msg: inference_pb2.GenerateRequest, context: grpc.ServicerContext, prefix: str) -> Request:
        try:
            return request_from_proto(msg, tokenizer=self.tokenizer, context_len=self.context_len, prefix=prefix)
        except RequestError as err:
            errors.invalid_argument(context, err.field, err.reason)

    def _submit(self, reqs: list[Request], context: grpc.ServicerContext, prefix: str) -> list[RequestHandle]:
        try:
            return self.engine.submit_many(reqs)
        except QueueFull as err:
            errors.resource_exhausted(context, str(err))
        except DuplicateRequest as err:  # a request_id already in flight (or repeated in the batch)
            errors.invalid_argument(context, f"{prefix.format(err.index)}request_id", str(err))
        except ValueError as err:  # a prompt beyond the context (request_from_proto checks it first)
            errors.invalid_argument(context, "prompt" if len(reqs) == 1 else "requests", str(err))
        except RuntimeError as err:  # the engine is shutting down
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))


class _Refused(Exception):
    """A call refused by the shared validation (`_RefusingContext.abort`); the async handlers turn it into the
    call's status with `await context.abort`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _RefusingContext:
    """What InferenceService's validation helpers need of a context, for a grpc.aio call, whose `abort` is a
    coroutine: abort raises `_Refused`."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Refused(code, details)


_REFUSING = _RefusingContext()


class AsyncInferenceService(InferenceService):
    """InferenceService for a grpc.aio server: every stream is served from the server's one event-loop thread.

    The threaded server gives each open stream a thread that wakes per message and takes the GIL from the engine's
    loop (H200: 39k tokens/s over 64 streams, 56k over 256, from an engine that makes 394k at 256 concurrent). Here
    one pump (`_StreamPump`) looks at every open stream's queue each `PUMP_TICK_S` on the loop and wakes a stream's
    handler only when it has a message to send: its first token and its final chunk at once, the tokens between
    under the budget (`messages_per_s`).
    Validation and errors are InferenceService's; ListModels and Tokenize are its plain methods (grpc.aio runs them
    in its thread pool). A call cancelled, past its deadline or disconnected cancels its request at once."""

    def __init__(self, engine: Engine, model: ServedModel, messages_per_s: float = STREAM_MESSAGES_PER_S) -> None:
        super().__init__(engine, model, messages_per_s)
        self._pump: _StreamPump | None = None  # made on the loop by the first stream

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            self._check_model(request.model, _REFUSING, "model")
            (handle,) = self._submit([self._request(request, _REFUSING, "")], _REFUSING, "")
        except _Refused as refused:
            await context.abort(refused.code, refused.details)
        if self._pump is None:
            self._pump = _StreamPump(self.messages_per_s)
        stream = self._pump.open(handle)
        ended = False
        try:
            while not ended:
                chunks = await stream.next_message()
                ended = chunks[-1].final
                yield _response(_merged(chunks))
        finally:  # also on cancellation, deadline, disconnect (the handler's task is cancelled)
            self._pump.close(stream)
            if not ended:
                handle.cancel()

    async def GenerateBatch(
        self, request: inference_pb2.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateBatchResponse:
        handles: list[RequestHandle] = []
        try:
            try:
                reply = self._batch_submit(request, _REFUSING, handles)
            except _Refused as refused:
                await context.abort(refused.code, refused.details)
            # One executor thread waits for the finals (not the hot path: a batch is one message).
            return await asyncio.get_running_loop().run_in_executor(None, reply)
        finally:  # cancelled, past its deadline: free the slots (a no-op for requests already ended)
            for h in handles:
                h.cancel()


class _Stream:
    """One open Generate stream, as the pump sees it."""

    __slots__ = ("handle", "chunks", "waiter", "sent_at", "final")

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle
        self.chunks: list[Chunk] = []  # taken from the engine, not yet sent
        self.waiter: asyncio.Future | None = None  # the handler, waiting for its next message
        self.sent_at: float | None = None  # when its last message went (None: none yet)
        self.final = False

    async def next_message(self) -> list[Chunk]:
        self.waiter = asyncio.get_running_loop().create_future()
        return await self.waiter


class _StreamPump:
    """Moves the engine's chunks to the open streams of one event loop: a task that runs while streams are open,
    every `PUMP_TICK_S` drains each stream's queue and hands a waiting handler its message when it is due.

    Due at once: a stream's first token, its final chunk, or tokens held `STREAM_HOLD_MAX_S`. The rest go when the
    stream's share of the budget has passed (open streams / `messages_per_s`, at most `STREAM_INTERVAL_MAX_S`) and
    the server-wide allowance (`messages_per_s`, banked for at most `PACE_BURST_S`) has one, taken round-robin: every
    stream's message in one pass would hold the loop for all their writes (gRPC writes holding the GIL), and new calls
    wait to be accepted meanwhile (tools.grpc_probe, 256 streams: ~0.6 s from a client's call to its handler)."""

    def __init__(self, messages_per_s: float) -> None:
        self.messages_per_s = messages_per_s
        self._burst = max(1.0, messages_per_s * PACE_BURST_S)
        self._allowance = self._burst
        self._last: float | None = None  # the last pass's time
        self._next = 0  # where the next pass starts looking for regular messages (round-robin)
        self._streams: list[_Stream] = []
        self._task: asyncio.Task | None = None

    def open(self, handle: RequestHandle) -> _Stream:
        stream = _Stream(handle)
        self._streams.append(stream)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return stream

    def close(self, stream: _Stream) -> None:
        self._streams.remove(stream)
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.cancel()

    async def _run(self) -> None:
        while self._streams:
            await asyncio.sleep(PUMP_TICK_S)
            try:
                self.deliver(time.monotonic())
            except Exception:  # a bug here must not leave every open stream waiting forever
                log.exception("stream pump pass failed")

    def deliver(self, now: float) -> None:
        """One pass over the open streams (public for tests)."""
        streams, k = self._streams, len(self._streams)
        interval = min(k / self.messages_per_s, STREAM_INTERVAL_MAX_S)
        since = 0.0 if self._last is None else max(0.0, now - self._last)
        self._allowance = min(self._allowance + since * self.messages_per_s, self._burst)
        self._last = now
        start = self._next % k if k else 0
        for i in range(k):
            stream = streams[(start + i) % k]
            if stream.handle.ready():
                more = stream.handle.next_chunks(0)  # what the engine queued so far
                stream.chunks.extend(more)
                stream.final = more[-1].final
            waiter = stream.waiter
            if not stream.chunks or waiter is None:
                continue
            sent_at = stream.sent_at
            if not (stream.final or sent_at is None or now - sent_at >= STREAM_HOLD_MAX_S):
                if now - sent_at < interval or self._allowance < 1:
                    continue
                self._next = start + i + 1
            self._allowance = max(self._allowance - 1, -self._burst)
            # The first token goes alone (never held for the ones behind it); then all that is there.
            n = 1 if sent_at is None else len(stream.chunks)
            if not waiter.done():  # (a cancelled handler's waiter)
                waiter.set_result(stream.chunks[:n])
            stream.chunks, stream.waiter, stream.sent_at = stream.chunks[n:], None, now


def _merged(chunks: list[Chunk]) -> Chunk:
    """Several chunks of one stream as one (the last one's final fields)."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    ids = tuple(t for c in chunks for t in c.token_ids)
    return Chunk(last.request_id, ids, "".join(c.text for c in chunks), *last[3:])


def _next_merged(handle: RequestHandle, timeout: float) -> Chunk | None:
    """The next chunk, merged with every chunk already waiting behind it (one message for a burst of
    tokens when the caller reads slower than the engine writes)."""
    chunks = handle.next_chunks(timeout)
    return _merged(chunks) if chunks else None


def _result(chunk: Chunk) -> inference_pb2.GenerateResult:
    return inference_pb2.GenerateResult(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finish_reason=_FINISH[chunk.finish_reason],
        usage=_usage(chunk),
        timings=_timings(chunk),
        error=chunk.error,
    )


def _usage(chunk: Chunk) -> common_pb2.Usage | None:
    if chunk.usage is None:
        return None
    return common_pb2.Usage(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=chunk.usage.completion_tokens)


def _timings(chunk: Chunk) -> common_pb2.Timings | None:
    t = chunk.timings
    if t is None:
        return None
    return common_pb2.Timings(
        ttft_ms=t.ttft_ms, mean_inter_token_ms=t.mean_inter_token_ms, total_ms=t.total_ms, queue_ms=t.queue_ms
    )


def _response(chunk: Chunk) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finish_reason=_FINISH[chunk.finish_reason] if chunk.final else inference_pb2.FINISH_REASON_UNSPECIFIED,
        usage=_usage(chunk),
        timings=_timings(chunk),
        error=chunk.error,
    )
