"""Running an ASGI app on uvicorn in a background thread, beside the gRPC server in the same process.

The socket is bound here (port 0 picks a free one) and handed to uvicorn, so the caller knows the port before
the first request; uvicorn's own signal handling stays off (it is not the main thread): main.py owns SIGTERM.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

__all__ = ["RunningHttpServer", "serve_http"]


@dataclass
class RunningHttpServer:
    """A started uvicorn server; `stop()` lets in-flight responses finish for up to `grace` seconds."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int
    url: str  # http://host:port

    def stop(self, grace: float = 2.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=grace)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=grace)


def serve_http(app, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0) -> RunningHttpServer:
    """Serves `app` on `host:port` (loopback by default); returns once it accepts connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections, and without it each
    # server-sent event after the headers waits out the client's delayed ACK (~40 ms) under Nagle's algorithm.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"could not bind HTTP server to {host}:{port}: {err}") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tinylm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server on {host}:{bound} did not start")
        time.sleep(0.01)
    shown = f"[{host}]" if ":" in host else host
    return RunningHttpServer(server=server, thread=thread, port=bound, url=f"http://{shown}:{bound}")
