"""A real, throwaway redis-server for the tests of every service (and for benchmarks).

    with RedisServer() as server:            # a free loopback port in a temp dir
        queue = JobQueue(server.url)

    @pytest.fixture
    def redis_server():                       # a fixture is three lines
        with RedisServer() as server:
            yield server

`RedisServer(aof=True)` keeps an append-only file fsynced on every write, so `restart()` (same port, same
data dir) brings back everything that was acknowledged; `stop(kill=True)` is a crash (SIGKILL).
"""

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import redis

__all__ = ["RedisServer", "RedisServerError"]

_READY_TIMEOUT_S = 15.0
_PORT_TRIES = 5  # another process may take the free port between our probe and redis-server's bind


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the starting thread dies (Linux), so no server leaks.

    The kernel ties this to the thread, not the process, so it is only asked for from the main thread.
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _on_main_thread_of_linux() -> bool:
    return sys.platform == "linux" and threading.current_thread() is threading.main_thread()


class RedisServer:
    """A redis-server child on 127.0.0.1 with its own data dir; `url` points at it while it runs."""

    def __init__(self, aof: bool = False, executable: Optional[str] = None, data_dir: Optional[str] = None) -> None:
        wanted = executable or "redis-server"
        found = shutil.which(wanted)
        if found is None:
            raise RedisServerError(
                f"{wanted} is not on PATH (or not executable); install it with `apt-get install redis-server`"
            )
        self.executable = found
        self.aof = aof
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="tinylm-redis-"))
        self.port: Optional[int] = None
        self._process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("the server has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        """A plain client of this server (bytes replies)."""
        return redis.Redis.from_url(self.url)

    def start(self) -> "RedisServer":
        """Start on a free port (first time) or on the same port as before (after stop)."""
        if self.running:
            return self
        if self.port is not None:
            self._launch(self.port)
            return self
        for attempt in range(_PORT_TRIES):
            try:
                self._launch(_free_port())
                return self
            except RedisServerError:
                if attempt == _PORT_TRIES - 1:
                    raise
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM (a clean shutdown) or, with kill=True, SIGKILL (a crash)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self._process.wait(timeout=_READY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def restart(self, kill: bool = False) -> None:
        """Stop, then start again on the same port with the same data dir."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its data dir (if we made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, port: int) -> list[str]:
        command = [
            self.executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        if self.aof:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        return command

    def _launch(self, port: int) -> None:
        process = subprocess.Popen(
            self._command(port),
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if _on_main_thread_of_linux() else None,
        )
        probe = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1.0)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RedisServerError(f"redis-server exited with {process.returncode}: {self._log_tail()}")
                try:
                    if probe.ping():
                        self._process, self.port = process, port
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.02)  # not listening yet, or still loading the AOF
            process.kill()
            process.wait()
            raise RedisServerError(f"redis-server did not answer on port {port}: {self._log_tail()}")
        finally:
            probe.close()

    def _log_tail(self) -> str:
        log = self.data_dir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
