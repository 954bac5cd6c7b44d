"""Streaming load on an InferenceService: N `Generate` streams spread over client processes, measured by the clients.

Used by the serving bench's gRPC rows (`bench_svc.benches.inference_serving`) and `tools.grpc_probe`. No torch here:
each client process imports this module (spawn), and 8 processes importing torch while the first ones already
stream would share the cores with the server during the measurement. The processes start together (a barrier)
once every one has imported and connected.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import grpc

from protos import inference_pb2, inference_pb2_grpc
from rpc.client import channel

__all__ = ["grpc_load", "percentile", "stream_client"]

_barrier: Any = None  # a client process's start barrier (set by the pool's initializer)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _set_barrier(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def stream_client(address: str, n_threads: int, n_requests: int, prompt: str, new_tokens: int) -> list[dict[str, Any]]:
    """One client process: `n_threads` streams, each sending `n_requests` greedy requests back to back. Per request:
    start and end (perf_counter), tokens, messages, TTFT and the inter-token gaps (a message's gap spread over its
    tokens)."""
    params = inference_pb2.SamplingParameters(max_new_tokens=new_tokens, temperature=0.0, has_temperature=True)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def stream(ch) -> None:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        for _ in range(n_requests):
            t0 = last = time.perf_counter()
            ttft, gaps, n, messages, engine_ttft = None, [], 0, 0, None
            for reply in stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, params=params), timeout=600):
                now = time.perf_counter()
                k = len(reply.token_ids)
                messages += 1
                if reply.finish_reason:  # the final message: the engine's own TTFT (submit to its first token)
                    engine_ttft = reply.timings.ttft_ms
                if k and ttft is None:
                    ttft = (now - t0) * 1e3
                elif k:
                    gaps += [(now - last) * 1e3 / k] * k
                if k:
                    last, n = now, n + k
            record = {"start": t0, "end": time.perf_counter(), "tokens": n, "messages": messages, "ttft_ms": ttft,
                      "engine_ttft_ms": engine_ttft}  # fmt: skip
            with lock:
                records.append({**record, "gaps_ms": gaps})

    with channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        if _barrier is not None:
            _barrier.wait()
        threads = [threading.Thread(target=stream, args=(ch,)) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return records


def grpc_load(
    address: str, streams: int, requests_per_stream: int, prompt: str, new_tokens: int, processes: int
) -> dict[str, float | None]:
    """`streams` concurrent streaming clients spread over `processes` client processes: tokens/s (all tokens over
    the first start to the last end), TTFT and inter-token percentiles, the engine's own TTFT p50 (from the final
    messages' timings: the rest of a client's TTFT is the server's and the client's delivery), and the messages the
    server sent (per second, and tokens per message)."""
    stream_client(address, 1, 1, prompt, 4)  # warm-up: connection, first request
    per_proc = [n for n in (streams // processes + (i < streams % processes) for i in range(processes)) if n]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(per_proc))  # one task per process: each blocks at the barrier until all are in
    with ctx.Pool(len(per_proc), initializer=_set_barrier, initargs=(barrier,)) as pool:
        parts = pool.starmap(
            stream_client, [(address, n, requests_per_stream, prompt, new_tokens) for n in per_proc], chunksize=1
        )
    records = [r for part in parts for r in part]
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)  # perf_counter is system-wide on Linux
    gaps = [g for r in records for g in r["gaps_ms"]]
    ttft = [r["ttft_ms"] for r in records if r["ttft_ms"] is not None]
    engine_ttft = [r["engine_ttft_ms"] for r in records if r["engine_ttft_ms"] is not None]
    tokens, messages = sum(r["tokens"] for r in records), sum(r["messages"] for r in records)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p95_ms": percentile(ttft, 95),
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p95_ms": percentile(gaps, 95),
        "engine_ttft_p50_ms": percentile(engine_ttft, 50),
        "messages_per_s": messages / wall,
        "tokens_per_message": tokens / max(1, messages),
    }
