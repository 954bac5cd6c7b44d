"""Starting a tinylm gRPC server the same way for every service.

Every server gets the standard health service (SERVING for each of its services) and server reflection,
binds loopback unless told otherwise, and may add TLS and a bearer token (DESIGN.md, "gRPC conventions").
"""

from __future__ import annotations

import hmac
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

__all__ = [
    "RunningServer",
    "UNAUTHENTICATED_DETAILS",
    "bearer_token_ok",
    "bind",
    "reflection_names",
    "serve",
    "serve_from_args",
    "serve_until_signalled",
]

AddServicer = Callable[[Any, grpc.Server], None]
UNAUTHENTICATED_DETAILS = "missing or wrong bearer token in `authorization` metadata"


def bearer_token_ok(expected: bytes, handler_call_details: Any) -> bool:
    """Whether a call passes the bearer-token check: health checks always (load balancers), the rest with
    `authorization: <expected>` (b"Bearer <token>"), compared in constant time. Shared by the threaded and the
    asyncio servers' interceptors."""
    if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
        return True
    given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
    return hmac.compare_digest(given.encode(), expected)


def reflection_names(service_names: Sequence[str]) -> list[str]:
    """What server reflection lists: the services, health and reflection itself."""
    return [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]


def bind(server: Any, host: str, port: int, tls_key_cert: tuple[bytes, bytes] | None) -> tuple[int, str]:
    """Bind a grpc (or grpc.aio) server to host:port, TLS with (key, certificate chain) or plaintext; returns the
    bound port and the address clients dial (an IPv6 host in brackets). OSError when nothing was bound."""
    target = f"{host}:{port}"
    if tls_key_cert is not None:
        bound = server.add_secure_port(target, grpc.ssl_server_credentials([tls_key_cert]))
    else:
        bound = server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {target}")
    shown_host = f"[{host}]" if ":" in host else host
    return bound, f"{shown_host}:{bound}"


@dataclass
class RunningServer:
    """A started server; `stop()` drains in-flight calls for up to `grace` seconds."""

    server: grpc.Server
    port: int
    address: str
    health: health.HealthServicer

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


class _BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (health checks stay open for load balancers)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if bearer_token_ok(self._expected, handler_call_details):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny


def serve(
    add_servicers: Sequence[tuple[AddServicer, Any]],
    service_names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    token: str | None = None,
    max_workers: int = 16,
) -> RunningServer:
    """Starts a server with the given servicers; port 0 picks a free one. Returns once it listens.

    `add_servicers` pairs each generated `add_XServicer_to_server` with its servicer; `service_names` are the full
    names (`tinylm.v1.InferenceService`) that health and reflection report.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key: give both (TLS) or neither (plaintext)")
    interceptors = [_BearerTokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors)
    for add, servicer in add_servicers:
        add(servicer, server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*service_names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(reflection_names(service_names), server)
    bound, address = bind(server, host, port, (tls_key, tls_cert) if tls_cert is not None else None)
    server.start()
    return RunningServer(server=server, port=bound, address=address, health=health_servicer)


def serve_from_args(
    add_servicers: Sequence[tuple[AddServicer, Any]],
    service_names: Sequence[str],
    args: Any,
    *,
    token: str | None,
    max_workers: int = 16,
) -> RunningServer:
    """`serve` with a service entry point's parsed flags: `args.host`, `args.port`, and `args.tls_cert` /
    `args.tls_key` (paths, or None for plaintext)."""
    return serve(
        add_servicers,
        service_names,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        tls_key=args.tls_key.read_bytes() if args.tls_key else None,
        token=token or None,
        max_workers=max_workers,
    )


def serve_until_signalled(
    running: RunningServer, workers: Sequence[threading.Thread], stop: threading.Event, *, drain_s: float
) -> None:
    """Blocks until SIGINT or SIGTERM (or until `stop` is set), then stops taking calls and waits up to `drain_s`
    for each queue worker, which sees `stop` and finishes or hands back its current job."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    running.stop(grace=5.0)
    for thread in workers:
        thread.join(timeout=drain_s)
