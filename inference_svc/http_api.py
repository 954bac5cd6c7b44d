"""The OpenAI-compatible HTTP face of one `Engine` (a Starlette ASGI app; http_server.py runs it on uvicorn).

    POST /v1/completions   prompt, max_tokens, temperature, top_p, seed, stop, stream (+ top_k, repetition_penalty)
    GET  /v1/models        the served model
    GET  /health           200 while the server is up (no token needed)
    GET  /metrics          Prometheus text format (inference_svc/metrics.py)

It shares the engine (and so the KV slots and the queue) with the gRPC service. A bad field answers 400 in
OpenAI's error shape naming the field; a full queue 429; a stream whose client goes away cancels its request,
which frees its slot by the next engine step. With a token, /v1/* needs `Authorization: Bearer TOKEN`;
/health and /metrics stay open for load balancers and scrapers, as the gRPC health service does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import uuid
from typing import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from inference_svc.engine import Chunk, Engine, FinishReason, QueueFull, RequestHandle
from inference_svc.metrics import EngineMetrics
from inference_svc.openai_protocol import (
    chunk_object,
    completion_object,
    error_body,
    models_object,
    now_unix,
    parse_completion,
)
from inference_svc.params import RequestError
from inference_svc.service import MIN_ID_PREFIX, ServedModel

__all__ = ["build_app"]

_POLL_S = 0.25  # longest a waiting non-streamed request goes without looking at its client


def build_app(
    engine: Engine, model: ServedModel, metrics: EngineMetrics | None = None, *, token: str | None = None
) -> Starlette:
    """The ASGI app serving `engine`'s `model`; `metrics` adds GET /metrics."""
    api = _CompletionsAPI(engine, model, token)
    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    if metrics is not None:
        routes.append(
            Route("/metrics", lambda _: Response(metrics.render(), media_type=CONTENT_TYPE_LATEST), methods=["GET"])
        )
    return Starlette(routes=routes)


class _CompletionsAPI:
    def __init__(self, engine: Engine, model: ServedModel, token: str | None) -> None:
        self.engine = engine
        self.model = model
        self.model_name = model.name or model.id
        self.created = now_unix()
        self._expected = f"Bearer {token}".encode() if token else None

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def models(self, request: HttpRequest) -> Response:
        return self._unauthorized(request) or JSONResponse(models_object(self.model_name, self.created))

    async def completions(self, request: HttpRequest) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError as err:
            return _error(400, f"the body is not JSON: {err}")
        try:
            parsed = parse_completion(body, tokenizer=self.engine.tokenizer, context_len=self.engine.runner.max_len)
        except RequestError as err:
            return _error(400, f"{err.field}: {err.reason}" if err.field else err.reason, param=err.field)
        if parsed.model and not self._serves(parsed.model):
            return _error(
                404,
                f"model {parsed.model!r} not found; this server serves {self.model_name!r} ({self.model.id})",
                param="model",
                code="model_not_found",
            )
        try:
            handle = self.engine.submit(parsed.request)
        except QueueFull as err:
            return _error(429, str(err), kind="rate_limit_exceeded", code="rate_limit_exceeded")
        except ValueError as err:  # a prompt beyond the runner's context
            return _error(400, str(err), param="prompt")
        except RuntimeError as err:  # the engine is shutting down
            return _error(503, str(err), kind="server_error")
        cid = f"cmpl-{uuid.uuid4().hex}"
        chunks = _ChunkPump(handle, asyncio.get_running_loop())
        if parsed.stream:
            return StreamingResponse(
                self._events(handle, chunks, cid), media_type="text/event-stream", headers={"cache-control": "no-cache"}
            )
        return await self._whole(request, handle, chunks, cid)

    # Helpers ------------------------------------------------------------------------------------------

    async def _whole(self, request: HttpRequest, handle: RequestHandle, chunks: "_ChunkPump", cid: str) -> Response:
        """Wait for the end (cancelling if the client leaves meanwhile); one completion object."""
        texts: list[str] = []
        try:
            while True:
                chunk = await chunks.next_batch(_POLL_S)
                if chunk is None:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                texts.append(chunk.text)
                if chunk.final:
                    break
        finally:
            handle.cancel()  # a no-op once the request ended
        if chunk.finish_reason is FinishReason.ERROR:
            return _error(500, chunk.error or "generation failed", kind="server_error")
        if chunk.finish_reason is FinishReason.CANCELLED:
            return _error(503, chunk.error or "the request was cancelled", kind="server_error")
        return JSONResponse(completion_object(cid, now_unix(), self.model_name, chunk._replace(text="".join(texts))))

    async def _events(self, handle: RequestHandle, chunks: "_ChunkPump", cid: str) -> AsyncIterator[str]:
        """Server-sent events: one per batch of tokens the engine made since the last, usage in the last, then [DONE].
        Closing the generator (the client went away) cancels the request."""
        created = now_unix()
        try:
            while True:
                chunk = await chunks.next_batch()
                if chunk.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    message = chunk.error or f"the request ended: {chunk.finish_reason.value}"
                    yield _sse(error_body(message, kind="server_error"))
                    break
                yield _sse(chunk_object(cid, created, self.model_name, chunk.text, chunk if chunk.final else None))
                if chunk.final:
                    break
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    def _serves(self, ref: str) -> bool:
        """The gRPC service's rule: the name, the id, or an id prefix of at least MIN_ID_PREFIX characters."""
        return ref in (self.model.name, self.model.id) or (len(ref) >= MIN_ID_PREFIX and self.model.id.startswith(ref))

    def _unauthorized(self, request: HttpRequest) -> Response | None:
        if self._expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, self._expected):
            return None
        return _error(
            401,
            "missing or wrong bearer token in the Authorization header",
            kind="authentication_error",
            code="invalid_api_key",
        )


class _ChunkPump:
    """A request's chunks, moved from the engine's queue onto the event loop: one thread per request blocks on the
    engine's queue (so the loop never does) and hands each chunk over with `call_soon_threadsafe`. The thread ends
    with the final chunk, which the engine always sends (a cancelled request's included)."""

    def __init__(self, handle: RequestHandle, loop: asyncio.AbstractEventLoop) -> None:
        self._chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        self._handle = handle
        self._loop = loop
        threading.Thread(target=self._pump, name=f"tinylm-http-{handle.request_id[:8]}", daemon=True).start()

    def _pump(self) -> None:
        for chunk in self._handle:
            try:
                self._loop.call_soon_threadsafe(self._chunks.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: the server stopped
                return

    async def next_batch(self, timeout: float | None = None) -> Chunk | None:
        """The next chunk merged with every one already behind it (one event for a burst of tokens), or None when
        none came within `timeout` seconds."""
        try:
            first = await (self._chunks.get() if timeout is None else asyncio.wait_for(self._chunks.get(), timeout))
        except asyncio.TimeoutError:
            return None
        texts, last = [first.text], first
        while not last.final and not self._chunks.empty():
            last = self._chunks.get_nowait()
            texts.append(last.text)
        return last._replace(text="".join(texts)) if len(texts) > 1 else last  # (token ids are not sent over HTTP)


def _error(
    status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, param=param, kind=kind, code=code), status_code=status)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
