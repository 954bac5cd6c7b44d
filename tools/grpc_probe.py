"""Diagnostics for the gRPC server around the engine: its ceiling with no model behind it.

    python -m tools.grpc_probe [--streams 64,256] [--new-tokens 200] [--requests 4] [--processes 8] [--step-ms 0.25]

Starts the real `InferenceService` on loopback, built as `./tinylm serve` builds it, over an `Engine` whose runner
returns at once (`tools.serve_probe.InstantRunner`; `--step-ms` adds a sleep per step that releases the GIL, as the
engine's wait for a GPU step does) and a 65-character tokenizer, then runs N streaming clients (greedy, back to back)
in `--processes` client processes, the way the serving bench's gRPC rows do. Prints tokens/s, TTFT p50/p95,
inter-token p50, messages/s and tokens per message, and the server process's CPU seconds per 1k tokens.
A diagnostic tool, not a benchmark: on a small CPU the clients share the cores with the server.
`--profile FILE` writes the server's cProfile stats (every thread's Python would need py-spy: see PERF_NOTES 6b).
"""

from __future__ import annotations

import argparse
import cProfile
import math
import resource
import sys
import time

import torch

from bench_svc.benches.grpc_clients import grpc_load
from inference_svc.engine import Engine
from inference_svc.main import start_grpc
from inference_svc.service import STREAM_MESSAGES_PER_S, ServedModel
from model.tokenizers import CharTokenizer
from tools.serve_probe import InstantRunner

__all__ = ["PacedRunner", "main", "probe"]

PROMPT = "TO BE, OR NOT TO BE"  # in the probe's vocabulary (chr(32)..chr(96))


class PacedRunner(InstantRunner):
    """`InstantRunner` whose decode step takes `step_s` seconds off the GIL (a sleep), as a GPU step's wait does:
    the engine thread then has to take the GIL back from the server's threads every step."""

    def __init__(self, n_slots: int, step_s: float) -> None:
        super().__init__(n_slots)
        self.step_s = step_s

    def decode_sample(self, slots, kv_len: int, full: bool) -> torch.Tensor:
        if self.step_s > 0:
            time.sleep(self.step_s)
        return super().decode_sample(slots, kv_len, full)


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
) -> dict[str, float | None]:
    """One server (`streams` slots) and its load; the load's figures plus the server process's CPU per 1k tokens."""
    tokenizer = CharTokenizer([chr(32 + i) for i in range(65)])
    engine = Engine(PacedRunner(streams, step_ms / 1e3), tokenizer, max_queue=4 * streams)
    model = ServedModel(id="0" * 12, name="grpc-probe")
    old_interval = sys.getswitchinterval()
    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1e3)
    running = start_grpc(engine, model, server=server, messages_per_s=messages_per_s, host="127.0.0.1", port=0)
    try:
        cpu0, children0 = time.process_time(), _children_cpu()
        load = grpc_load(running.address, streams, requests, PROMPT, new_tokens, processes)
        cpu, children = time.process_time() - cpu0, _children_cpu() - children0
    finally:
        running.stop(0)
        engine.close()
        sys.setswitchinterval(old_interval)
    tokens = streams * requests * new_tokens
    return {
        **load,
        "server_cpu_s_per_1k_tokens": cpu / tokens * 1e3,
        "client_cpu_s_per_1k_tokens": children / tokens * 1e3,
    }


def _children_cpu() -> float:
    """CPU seconds of this process's ended children (the client processes, once their pool is closed)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.grpc_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="64,256", help="comma-separated stream counts, one server each")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens per request (greedy)")
    p.add_argument("--requests", type=int, default=4, help="requests per stream, back to back")
    p.add_argument("--processes", type=int, default=8, help="client processes the streams are spread over")
    p.add_argument("--step-ms", type=float, default=0.25, help="each decode step's sleep, off the GIL (0: none)")
    p.add_argument("--server", choices=["aio", "threads"], default="aio", help="server construction (main.py)")
    p.add_argument(
        "--messages-per-s", type=float, default=STREAM_MESSAGES_PER_S, help="the service's stream message budget"
    )
    p.add_argument("--switch-interval-ms", type=float, default=None, help="sys.setswitchinterval in the server")
    p.add_argument("--profile", default="", help="write the server process's cProfile stats here (its main thread)")
    args = p.parse_args(argv)
    for name in ("new_tokens", "requests", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.step_ms >= 0 and math.isfinite(args.step_ms)):
        p.error(f"--step-ms must be a finite number >= 0, got {args.step_ms}")
    counts = [int(x) for x in args.streams.split(",")]
    if min(counts) < 1:
        p.error(f"--streams must be positive integers, got {args.streams!r}")
    print(
        f"{'streams':>7} {'server':>7} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} "
        f"{'msg/s':>8} {'tok/msg':>7} {'server cpu/1k':>13} {'client cpu/1k':>13}",
        flush=True,
    )
    profiler = cProfile.Profile() if args.profile else None
    for n in counts:
        if profiler:
            profiler.enable()
        r = probe(
            n,
            new_tokens=args.new_tokens,
            requests=args.requests,
            processes=min(args.processes, n),
            step_ms=args.step_ms,
            server=args.server,
            messages_per_s=args.messages_per_s,
            switch_interval_ms=args.switch_interval_ms,
        )
        if profiler:
            profiler.disable()
        ms = lambda v: f"{v:>9.1f}" if v is not None else f"{'-':>9}"  # noqa: E731
        print(
            f"{n:>7} {args.server:>7} {r['tokens_per_s']:>9,.0f} {ms(r['ttft_p50_ms'])} {ms(r['ttft_p95_ms'])} "
            f"{r['itl_p50_ms'] or 0:>8.2f} {r['messages_per_s']:>8,.0f} {r['tokens_per_message']:>7.1f} "
            f"{r['server_cpu_s_per_1k_tokens']:>13.4f} {r['client_cpu_s_per_1k_tokens']:>13.4f}",
            flush=True,
        )
    if profiler:
        profiler.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
