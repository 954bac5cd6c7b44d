"""Diagnostics for the gRPC server around the engine: its ceiling with no model behind it.

    python -m tools.grpc_probe [--streams 64,256] [--server aio,threads] [--new-tokens 200] [--requests 4]
                               [--processes 8] [--step-ms 0.25] [--messages-per-s N] [--interval-max-ms MS]
                               [--decode-steps 0] [--async-device] [--prefill-ms MS] [--engine thread,process]

Starts the real service on loopback, built as `./tinylm serve` builds it (`inference_svc.main.start_grpc`), over an
`Engine` whose runner returns at once (`tools.serve_probe.InstantRunner`; `--step-ms` adds a sleep per decode step that
releases the GIL, as the engine's wait for a GPU step does; `--async-device`: a simulated device that runs the steps
while the engine's thread goes on, as a CUDA stream does, waited for at the engine's step events; `--prefill-ms`: a
prefill's time there) and a 65-character tokenizer, then runs N streaming
clients (greedy, back to back) in `--processes` client processes, the way the serving bench's gRPC rows do
(`bench_svc.benches.grpc_clients`). One row per (streams, server): the same engine alone (no server: the ceiling),
tokens/s, TTFT p50/p95 as the clients see it and the engine's own TTFT p50, inter-token p50, messages/s, tokens per
message, and the server process's CPU seconds per 1k tokens (every thread: engine, server, gRPC's own; with
`--engine process`, `./tinylm serve --engine-process`: the engine in a child process, whose CPU is added and also
shown alone).
A diagnostic tool, not a benchmark: on a small CPU the clients share the cores with the server.
Where the server's time goes, every thread (py-spy: `pip install py-spy` into the venv; `--gil`: who holds the GIL):
    py-spy record --gil --threads --native --format raw -o /tmp/spy.txt -- python -m tools.grpc_probe --streams 256
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path
import sys
import time

import torch

from bench_svc.benches.grpc_clients import grpc_load
from inference_svc.engine import DECODE_STEPS_GRAPHS, DECODE_STEPS_SMALL_BATCH, DecodeSteps, Engine
from inference_svc.engine_process import EngineProcess
from inference_svc.main import SERVERS, start_grpc
from inference_svc.params import Request
from inference_svc.runner import MAX_DECODE_STEPS, MULTI_STEP_GRAPH_MAX_BATCH
from inference_svc import service
from inference_svc.service import STREAM_MESSAGES_PER_S, ServedModel
from model.sampling import SamplingParams
from model.tokenizers import CharTokenizer
from tools.serve_probe import InstantRunner

__all__ = ["ENGINES", "PacedRunner", "main", "probe", "probe_engine"]

PROMPT = "TO BE, OR NOT TO BE"  # in the probe's vocabulary (chr(32)..chr(96))
ENGINES = ("thread", "process")  # the engine's loop in the server's process, or in a child (EngineProcess)


class PacedRunner(InstantRunner):
    """`InstantRunner` whose decode step takes `step_s` seconds off the GIL, as a GPU step's wait does: the engine
    thread then has to take the GIL back from the server's threads every step. By default a launch sleeps through its
    steps (the engine's thread waits in the launch); `asynchronous`: a simulated device, as a CUDA stream runs: a
    launch (prefill `prefill_s`, decode `step_s` per step) returns at once and queues its time on the device's clock,
    and the engine waits for a step at its mark (`record_event`, whose `synchronize` sleeps until the work launched
    before it is done), so the host's work overlaps the device's and a mark between two launches passes first."""

    def __init__(self, n_slots: int, step_s: float, *, asynchronous: bool = False, prefill_s: float = 0.0) -> None:
        super().__init__(n_slots)
        self.step_s, self.prefill_s, self.asynchronous = step_s, prefill_s, asynchronous
        self._busy_until = 0.0  # the simulated device's clock (perf_counter): when the work launched so far ends

    def prefill_sample(self, slots, prompts, params, seeds, starts=None) -> torch.Tensor:
        self._run(self.prefill_s)
        return super().prefill_sample(slots, prompts, params, seeds, starts)

    def decode_sample(self, slots, kv_len: int, full: bool, steps: int = 1) -> torch.Tensor:
        self._run(self.step_s * steps)
        return super().decode_sample(slots, kv_len, full, steps)

    def _run(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.asynchronous:
            self._busy_until = max(time.perf_counter(), self._busy_until) + seconds
        else:
            time.sleep(seconds)

    def record_event(self) -> "_DeviceMark | None":
        """A mark after the work launched so far (the engine's step event); None when launches wait themselves."""
        return _DeviceMark(self._busy_until) if self.asynchronous else None


class _DeviceMark:
    """A point on `PacedRunner`'s simulated device: `synchronize()` sleeps (off the GIL) until the device reaches it."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    def synchronize(self) -> None:
        wait = self.at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)


def probe_engine(
    streams: int, step_s: float, asynchronous: bool, prefill_s: float, max_queue: int, decode_steps: int | DecodeSteps
) -> Engine:
    """The probe's engine: `streams` slots over a `PacedRunner` and the 65-character tokenizer (module level: an
    engine process builds it from these arguments)."""
    tokenizer = CharTokenizer([chr(32 + i) for i in range(65)])
    runner = PacedRunner(streams, step_s, asynchronous=asynchronous, prefill_s=prefill_s)
    return Engine(runner, tokenizer, max_queue=max_queue, decode_steps=decode_steps)


def probe(
    streams: int,
    *,
    new_tokens: int,
    requests: int,
    processes: int,
    step_ms: float,
    server: str,
    messages_per_s: float,
    switch_interval_ms: float | None,
    decode_steps: int | DecodeSteps = DecodeSteps(),
    asynchronous: bool = False,
    prefill_ms: float = 0.0,
    engine: str = "thread",
) -> dict[str, float | None]:
    """One server (`streams` slots) and its load; the load's figures plus the server's CPU per 1k tokens (with
    `engine="process"` the engine process's CPU added, and also alone)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    build = functools.partial(
        probe_engine, streams, step_ms / 1e3, asynchronous, prefill_ms / 1e3, 4 * streams, decode_steps
    )
    served = EngineProcess(build) if engine == "process" else build()
    child = served.pid if engine == "process" else None
    model = ServedModel(id="0" * 12, name="grpc-probe")
    old_interval = sys.getswitchinterval()
    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1e3)
    running = start_grpc(served, model, server=server, messages_per_s=messages_per_s, host="127.0.0.1", port=0)
    try:
        cpu0 = time.process_time()  # every thread of this process: the engine's, the server's, gRPC's own
        child0 = _cpu_s(child)
        load = grpc_load(running.address, streams, requests, PROMPT, new_tokens, processes)
        cpu = time.process_time() - cpu0
        child_cpu = _cpu_s(child) - child0 if child is not None else None
    finally:
        running.stop(0)
        served.close()
        sys.setswitchinterval(old_interval)
    tokens = streams * requests * new_tokens
    return {
        **load,
        "server_cpu_s_per_1k_tokens": (cpu + (child_cpu or 0.0)) / tokens * 1e3,
        "engine_process_cpu_s_per_1k_tokens": None if child_cpu is None else child_cpu / tokens * 1e3,
    }


def _cpu_s(pid: int | None) -> float:
    """A process's CPU seconds so far (user + system, every thread; Linux /proc), 0 for None."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def engine_ceiling(
    streams: int,
    new_tokens: int,
    step_ms: float,
    decode_steps: int | DecodeSteps = DecodeSteps(),
    asynchronous: bool = False,
    prefill_ms: float = 0.0,
) -> float:
    """Tokens/s of the same engine with no server: `streams` requests at once, timed by the engine (submit to its last
    token), the figure the server's streams could reach at best."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    with probe_engine(streams, step_ms / 1e3, asynchronous, prefill_ms / 1e3, streams, decode_steps) as engine:
        tokenizer = engine.tokenizer
        finals = []
        for _ in range(2):  # the first is a warm-up
            handles = engine.submit_many([Request(tuple(tokenizer.encode(PROMPT)), params) for _ in range(streams)])
            finals = [h.result() for h in handles]
    last_ms = max(f.timings.token_ms[-1] for f in finals)
    return sum(len(f.token_ids) for f in finals) / (last_ms / 1e3)


# (header, width, key of the row): the table main prints, one row per stream count
COLUMNS = [
    ("streams", 7, "streams"),
    ("server", 7, "server"),
    ("engine", 7, "engine"),
    ("engine alone", 12, "engine_alone"),
    ("tok/s", 9, "tokens_per_s"),
    ("TTFT p50", 9, "ttft_p50_ms"),
    ("TTFT p95", 9, "ttft_p95_ms"),
    ("engine TTFT", 11, "engine_ttft_p50_ms"),
    ("ITL p50", 8, "itl_p50_ms"),
    ("msg/s", 8, "messages_per_s"),
    ("tok/msg", 7, "tokens_per_message"),
    ("server cpu s/1k tok", 19, "server_cpu_s_per_1k_tokens"),
    ("of it engine proc", 17, "engine_process_cpu_s_per_1k_tokens"),
]


def _cell(value: object, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width},.0f}" if value >= 100 else f"{value:>{width}.4g}"
    return f"{value:>{width}}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.grpc_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="64,256", help="comma-separated stream counts, one server each")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens per request (greedy)")
    p.add_argument("--requests", type=int, default=4, help="requests per stream, back to back")
    p.add_argument("--processes", type=int, default=8, help="client processes the streams are spread over")
    p.add_argument("--step-ms", type=float, default=0.25, help="each decode step's sleep, off the GIL (0: none)")
    p.add_argument(
        "--server", default="aio", help=f"comma-separated server constructions of main.start_grpc: {', '.join(SERVERS)}"
    )
    p.add_argument(
        "--messages-per-s", type=float, default=STREAM_MESSAGES_PER_S, help="the service's stream message budget"
    )
    p.add_argument(
        "--interval-max-ms",
        type=float,
        default=service.STREAM_INTERVAL_MAX_S * 1e3,
        help="the longest a stream's tokens are held (the service's STREAM_INTERVAL_MAX_S, set for this run)",
    )
    p.add_argument("--switch-interval-ms", type=float, default=None, help="sys.setswitchinterval in the server")
    p.add_argument(
        "--decode-steps",
        type=int,
        default=0,
        help="the engine's decode steps per engine step (default 0: by batch, as on CUDA graphs: "
        f"{DECODE_STEPS_SMALL_BATCH} up to {MULTI_STEP_GRAPH_MAX_BATCH} rows, {DECODE_STEPS_GRAPHS} above)",
    )
    p.add_argument(
        "--async-device",
        action="store_true",
        help="a simulated device that runs launched steps while the engine's thread goes on (as a CUDA stream), "
        "waited for at the engine's step events; default: each launch sleeps through its steps",
    )
    p.add_argument("--prefill-ms", type=float, default=0.0, help="each prefill launch's time on the device (0: none)")
    p.add_argument(
        "--engine",
        default="thread",
        help="comma-separated: thread (the engine's loop in the server's process, the default), process (in a child "
        "process, as `./tinylm serve --engine-process`); several run side by side, alternating",
    )
    p.add_argument("--engine-process", action="store_true", help="the same as --engine process")
    args = p.parse_args(argv)
    for name in ("new_tokens", "requests", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.decode_steps <= MAX_DECODE_STEPS:
        p.error(f"--decode-steps must be 0..{MAX_DECODE_STEPS} (0: by batch), got {args.decode_steps}")
    steps = DecodeSteps.fixed(args.decode_steps) if args.decode_steps else DecodeSteps()
    for name in ("step_ms", "prefill_ms"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not args.interval_max_ms > 0:
        p.error(f"--interval-max-ms must be > 0, got {args.interval_max_ms}")
    service.STREAM_INTERVAL_MAX_S = args.interval_max_ms / 1e3  # a diagnostic: the module's constant, this process
    servers = args.server.split(",")
    if not set(servers) <= set(SERVERS):
        p.error(f"--server: each must be one of {', '.join(SERVERS)}, got {args.server!r}")
    engines = ["process"] if args.engine_process else args.engine.split(",")
    if not set(engines) <= set(ENGINES):
        p.error(f"--engine: each must be one of {', '.join(ENGINES)}, got {args.engine!r}")
    counts = [int(x) for x in args.streams.split(",")]
    if min(counts) < 1:
        p.error(f"--streams must be positive integers, got {args.streams!r}")
    print(" ".join(f"{name:>{width}}" for name, width, _ in COLUMNS), flush=True)
    for n in counts:
        alone = engine_ceiling(n, args.new_tokens, args.step_ms, steps, args.async_device, args.prefill_ms)
        for server, engine in [(server, engine) for server in servers for engine in engines]:
            row = {"streams": n, "server": server, "engine": engine, "engine_alone": alone}
            row |= probe(
                n,
                new_tokens=args.new_tokens,
                requests=args.requests,
                processes=min(args.processes, n),
                step_ms=args.step_ms,
                server=server,
                messages_per_s=args.messages_per_s,
                switch_interval_ms=args.switch_interval_ms,
                decode_steps=steps,
                asynchronous=args.async_device,
                prefill_ms=args.prefill_ms,
                engine=engine,
            )
            print(" ".join(_cell(row[key], width) for _, width, key in COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
