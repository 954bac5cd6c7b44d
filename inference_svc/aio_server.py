"""The serving process's gRPC server on asyncio: grpc.aio on an event-loop thread of its own.

`rpc.server.serve` gives every call a thread of a pool; a streaming call holds its thread for its whole life, and
each of those threads takes the GIL from the engine's loop whenever it wakes. Here every coroutine handler runs on one
loop thread (`AsyncInferenceService`'s streams among them); plain handlers (ListModels, Tokenize) run in a small
thread pool. The same conventions as `rpc.server`: health (SERVING per service) and reflection, loopback unless told
otherwise, optional TLS and bearer token (health stays open).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from typing import Any, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rpc.server import UNAUTHENTICATED_DETAILS, AddServicer, bearer_token_ok, bind, reflection_names

__all__ = ["AioRunningServer", "serve_aio"]


class AioRunningServer:
    """A started grpc.aio server and its loop thread; `stop()` drains in-flight calls for up to `grace` seconds."""

    def __init__(self, server: grpc.aio.Server, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 port: int, address: str, health_servicer: Any) -> None:  # fmt: skip
        self.server, self.port, self.address, self.health = server, port, address, health_servicer
        self._loop, self._thread = loop, thread

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self, grace: float | None = 1.0) -> None:
        if not self._thread.is_alive():
            return

        async def drain() -> None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)

        self.run(drain())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def wait(self) -> None:
        self._thread.join()


class _BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (health checks stay open), as rpc.server's does."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        if bearer_token_ok(self._expected, handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return self._deny_stream if handler is not None and handler.response_streaming else self._deny


async def _start(
    add_servicers: Sequence[tuple[AddServicer, Any]],
    service_names: Sequence[str],
    host: str,
    port: int,
    tls: tuple[bytes, bytes] | None,
    token: str | None,
    max_workers: int,
) -> tuple[grpc.aio.Server, int, str, Any]:
    server = grpc.aio.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-aio-sync"),
        interceptors=[_BearerTokenInterceptor(token)] if token else None,
    )
    for add, servicer in add_servicers:
        add(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(reflection_names(service_names), server)
    bound, address = bind(server, host, port, tls)
    await server.start()
    return server, bound, address, health_servicer


def serve_aio(
    add_servicers: Sequence[tuple[AddServicer, Any]],
    service_names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[bytes | None, bytes | None] | None = None,
    token: str | None = None,
    max_workers: int = 8,
) -> AioRunningServer:
    """`rpc.server.serve` on grpc.aio: starts a loop thread and the server on it; returns once it listens.
    `tls` is (PEM certificate chain, PEM private key), None for plaintext; `max_workers` threads run the servicers'
    plain (non-coroutine) methods."""
    if tls is not None and (tls[0] is None or tls[1] is None):
        raise ValueError("tls: give both the certificate chain and the key (TLS), or None (plaintext)")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-aio-loop", daemon=True)
    thread.start()
    key_cert = (tls[1], tls[0]) if tls is not None else None  # grpc's order
    start = _start(add_servicers, service_names, host, port, key_cert, token, max_workers)
    try:
        server, bound, address, health_servicer = asyncio.run_coroutine_threadsafe(start, loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        raise
    return AioRunningServer(server, loop, thread, bound, address, health_servicer)
