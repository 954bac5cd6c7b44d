"""The serving engine in a process of its own (vLLM's AsyncLLM / EngineCore split).

In one process, the gRPC server's writes (grpc.aio's `sendmsg`, run holding the GIL) and the engine's loop thread
share one GIL: on the H200 at 256 streams the server reached 130-190k tokens/s against ~600k for the engine alone
(PERF_NOTES sections 6b and 8). `EngineProcess` offers the part of `Engine`'s interface the services use (`submit`,
`submit_many`, `cancel`, `stats`, `close`, `max_slots`, `tokenizer`, `runner.max_len`, `finish_listeners`, the same
`RequestHandle`s) and runs a real `Engine` in a spawned child, whose loop has a GIL of its own:

- The child builds its engine from `build`, a picklable callable that returns an `Engine` (a module-level function,
  or a `functools.partial` of one), and serves commands from one pipe on its main thread.
- Its engine puts every request's chunks in one outbox; after each engine step (`Engine.step_listeners`) the child
  sends what is there as one message, a list of the step's chunks (each carries its request id), over a second pipe.
  A receiver thread in the parent routes them into per-request queues: one pipe read and one unpickle per step.
- Admission is decided in the parent, synchronously, with the scheduler's own checks (`prepared`, `check_new_ids`,
  `check_room`), as vLLM's front end validates before it hands a request to its core: a submit costs one pipe write,
  not a round trip that waits for the child's GIL. The decision is the scheduler's: it admits while waiting + new <=
  max_queue + free slots, and waiting + running is the requests in flight, so in flight + new <= max_queue +
  max_slots. The parent counts a request in flight until its final chunk arrives (a moment after the child let it
  go), so at worst it refuses what the child would have taken a moment later, never the reverse.
- If the child dies, every open handle gets a final ERROR chunk and later submits raise RuntimeError.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

from inference_svc.engine import Chunk, Engine, EngineStats, FinishReason, RequestHandle, prepared
from inference_svc.params import Request
from inference_svc.scheduler import check_new_ids, check_room
from model.tokenizers import Tokenizer, tokenizer_from_json

__all__ = ["EngineProcess", "RunnerInfo"]

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0  # close(): how long the child may take to drain before it is killed


@dataclass(frozen=True)
class RunnerInfo:
    """What callers read of `Engine.runner`, as the child's runner reports it."""

    max_len: int  # context length
    n_slots: int
    device: str


@dataclass(frozen=True)
class _Ready:
    """The child's first message once its engine runs."""

    tokenizer_json: str
    runner: RunnerInfo
    max_slots: int
    max_queue: int


class EngineProcess:
    """`Engine`'s serving interface over an engine in a child process (module docstring). Starting returns once the
    child's engine runs (its build's error, e.g. a ValueError for a bad option, is raised here); `close()` (or leaving
    a `with` block) ends the child, and requests still in flight end CANCELLED, as `Engine.close` ends them."""

    def __init__(self, build: Callable[[], Engine], *, start_timeout_s: float = 600.0) -> None:
        ctx = mp.get_context("spawn")  # not fork: the parent has threads (gRPC's, torch's) a fork would copy mid-state
        self._commands, child_commands = ctx.Pipe()  # duplex: commands to the child, its replies back
        self._chunks, child_chunks = ctx.Pipe(duplex=False)  # (parent's receiving end, child's sending end)
        self._process = ctx.Process(
            target=_child_main, args=(build, child_commands, child_chunks), name="tinylm-engine", daemon=True
        )
        self._process.start()
        child_commands.close()  # the child holds the only copies now: its exit is our EOF
        child_chunks.close()
        try:
            if not self._commands.poll(start_timeout_s):
                raise RuntimeError(f"the engine process did not start within {start_timeout_s:g} s")
            ready: _Ready = _reply(self._commands, "while starting", self._process)
        except BaseException:
            self._stop_child()
            raise
        self.tokenizer: Tokenizer = tokenizer_from_json(ready.tokenizer_json)
        self.runner = ready.runner
        self.max_slots, self.max_queue = ready.max_slots, ready.max_queue
        # Called on the receiver thread with every final chunk, before its caller sees it (metrics), as Engine's.
        self.finish_listeners: list[Callable[[Chunk], None]] = []
        self._queues: dict[str, queue.SimpleQueue] = {}  # requests in flight: their chunks' queues
        self._lock = threading.Lock()  # admission, the command pipe's writes, the end
        self._call = threading.Lock()  # one command with a reply at a time
        self._closing = False
        self._ended = ""  # why submits are refused (closed, or the child's exit); "" while it runs
        self._receiver = threading.Thread(target=self._receive, name="tinylm-engine-receiver", daemon=True)
        self._receiver.start()
        gc.freeze()  # as Engine does: what exists now lives as long as the server

    # Caller side --------------------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestHandle:
        """`Engine.submit`: QueueFull, ValueError (bad request_id, prompt beyond the context), RuntimeError (closed,
        or the engine process is gone)."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[Request]) -> list[RequestHandle]:
        """`Engine.submit_many`: all or none, admitted here (module docstring), sent to the child in one message."""
        requests = prepared(requests, self.runner.max_len)
        ids = [r.request_id for r in requests]
        with self._lock:
            if self._ended:
                raise RuntimeError(self._ended)
            check_new_ids(ids, self._queues)
            in_flight = len(self._queues)
            check_room(len(ids), max(0, in_flight - self.max_slots), max(0, self.max_slots - in_flight), self.max_queue)
            sinks = [queue.SimpleQueue() for _ in ids]
            self._queues.update(zip(ids, sinks))  # before the child can send a chunk of theirs
            try:
                self._commands.send(("submit", requests))
            except (OSError, ValueError) as err:  # the child is gone (the receiver says so next)
                for rid in ids:
                    self._queues.pop(rid, None)
                raise RuntimeError(f"the engine process is gone ({err})") from err
        return [RequestHandle(self, rid, sink) for rid, sink in zip(ids, sinks)]

    def cancel(self, request_id: str) -> bool:
        """`Engine.cancel`: the child frees the slot at its next step and sends the final chunk (CANCELLED). False when
        the request is not in flight (its final chunk came already, or unknown)."""
        with self._lock:
            if self._ended or request_id not in self._queues:
                return False
            try:
                self._commands.send(("cancel", request_id))
            except (OSError, ValueError):
                return False
        return True

    def stats(self) -> EngineStats:
        """The child engine's `stats()` (one round trip); once the child has ended, every slot free and the
        requests still waiting for their final chunk in flight."""
        with self._call:
            try:
                with self._lock:
                    if self._ended:
                        raise EOFError
                    self._commands.send(("stats",))
                return _reply(self._commands, "", self._process)
            except (EOFError, OSError, RuntimeError):
                return EngineStats(self.max_slots, self.max_slots, 0, 0, len(self._queues), {})

    def close(self) -> None:
        """End the child: requests in flight end CANCELLED; returns once it has exited."""
        with self._lock:
            self._closing = True
            if not self._ended:
                try:
                    self._commands.send(("close",))
                except (OSError, ValueError):
                    pass
        self._receiver.join(JOIN_TIMEOUT_S)
        self._stop_child()
        self._receiver.join()

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._process.pid

    # Receiver thread ----------------------------------------------------------------------------------

    def _receive(self) -> None:
        """Route each step's chunks to their queues until the child's pipe ends, then end what is still open."""
        queues, chunks = self._queues, self._chunks
        try:
            while True:
                for item in chunks.recv():
                    if type(item) is Chunk:  # a final chunk (the rest are plain tuples: engine._as_chunk)
                        self._finish(item)
                    else:
                        sink = queues.get(item[0])
                        if sink is not None:
                            sink.put(item)
        except (EOFError, OSError):
            pass
        except Exception:  # a bug here must not leave every open stream waiting forever
            log.exception("engine process receiver failed")
        self._end()

    def _finish(self, chunk: Chunk) -> None:
        # No lock (a dict's pop is atomic): the receiver never waits for a submit, whose pipe write may wait for the
        # child, whose engine may wait for this receiver to read.
        sink = self._queues.pop(chunk.request_id, None)
        if sink is None:
            return
        for listener in self.finish_listeners:
            try:
                listener(chunk)
            except Exception:  # a metrics bug must not keep a caller from its final chunk
                log.exception("finish listener failed")
        sink.put(chunk)

    def _end(self) -> None:
        """The child's pipe ended: refuse submits from now on, and give every open request its final chunk (ERROR
        if the child died, CANCELLED if we closed it)."""
        self._process.join(5.0)  # its exit code, for the message
        with self._lock:
            if self._closing:
                reason, self._ended = FinishReason.CANCELLED, "the engine is closed"
            else:
                reason = FinishReason.ERROR
                self._ended = f"the engine process exited (exit code {self._process.exitcode})"
                log.error("%s; %d requests in flight end with an error", self._ended, len(self._queues))
            open_ = list(self._queues)
        for rid in open_:
            self._finish(Chunk(rid, (), "", finish_reason=reason, error=self._ended))

    def _stop_child(self) -> None:
        self._process.join(JOIN_TIMEOUT_S)
        if self._process.is_alive():
            log.error("the engine process did not exit in %g s; killing it", JOIN_TIMEOUT_S)
            self._process.kill()
            self._process.join()


def _reply(conn: Any, when: str, process: Any) -> Any:
    """The child's reply to a command: its value, or its error raised here."""
    try:
        kind, value = conn.recv()
    except EOFError:
        process.join(5.0)
        raise RuntimeError(f"the engine process exited{' ' + when if when else ''} (exit code {process.exitcode})")
    if kind == "error":
        raise value
    return value


# Child process -------------------------------------------------------------------------------------------


class _Outbox:
    """The child engine's one sink: every request's chunks in arrival order; `flush` sends them as one message."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the engine thread's flush and the command thread's `fail`
        self.items: list[Any] = []
        self.put = self.items.append  # what the engine calls per chunk (`Sequence.sink.put`)

    def flush(self) -> None:
        items = self.items
        if not items:
            return
        with self._lock:
            n = len(items)
            batch = items[:n]
            del items[:n]  # an append meanwhile (the other thread) lands after n: kept for the next flush
            self._conn.send(batch)

    def fail(self, requests: list[Request], err: Exception) -> None:
        """Final ERROR chunks for requests the child's engine refused (the parent admitted them: a bug or a race)."""
        for request in requests:
            self.put(Chunk(request.request_id, (), "", FinishReason.ERROR, error=f"{type(err).__name__}: {err}"))
        self.flush()


def _child_main(build: Callable[[], Engine], commands: Any, chunks: Any) -> None:
    """The engine process: build the engine, say it is ready, then serve commands until close (or the parent's exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    try:
        engine = build()
    except BaseException as err:
        commands.send(("error", _picklable(err)))
        return
    outbox = _Outbox(chunks)
    engine.step_listeners.append(outbox.flush)
    runner = engine.runner
    info = RunnerInfo(max_len=runner.max_len, n_slots=runner.n_slots, device=str(runner.device))
    commands.send(("ok", _Ready(engine.tokenizer.to_json(), info, engine.max_slots, engine.scheduler.max_queue)))
    try:
        while True:
            try:
                command = commands.recv()
            except EOFError:  # the parent is gone
                break
            op = command[0]
            if op == "submit":
                try:
                    engine.submit_many(command[1], sink=outbox)
                except Exception as err:
                    outbox.fail(command[1], err)
            elif op == "cancel":
                engine.cancel(command[1])
            elif op == "stats":
                commands.send(("ok", engine.stats()))
            elif op == "close":
                break
    finally:
        engine.close()  # requests in flight end CANCELLED; the step listener sends their final chunks


def _picklable(err: BaseException) -> BaseException:
    """`err`, or when it does not survive pickling (an exception class whose constructor takes other arguments) its
    message in the nearest class that does (FieldError -> ValueError), so the caller's `except` still matches."""
    for cls in type(err).__mro__:
        try:
            candidate = err if cls is type(err) else cls(f"{type(err).__name__}: {err}")
            pickle.loads(pickle.dumps(candidate))
            return candidate
        except Exception:
            continue
    return RuntimeError(f"{type(err).__name__}: {err}")
