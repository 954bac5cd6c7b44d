"""How the GPU times a kernel benchmark case, the device ceilings, and how a run's numbers are summarised.

`bench_svc/benches/kernels.py` runs every kernel's `bench_cases()` (declared beside the kernels,
`kernels/bench_common.BenchCase`) in one process after measuring the device ceilings, so every figure in a results
file comes from the same GPU and run. Timing is CUDA events around single calls, L2 flushed before each, median of
many after warm-up calls (as `triton.testing.do_bench`). Decode-time cases (`BenchCase.graph_calls > 0`) are timed
the way the serving engine calls them: that many calls captured in one CUDA graph, the graph replayed, its time divided
by the calls (`time_graph_ms`), so the host's launch cost, which dominates lone calls of small kernels, drops out; such
a case keeps its inputs cold in L2 itself (kernels/inference_bench.py rotates through copies of its weights). A replay
already averages tens to a thousand calls, so graph cases spend less time on repetitions (GRAPH_TARGET_TIMING_MS).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.bench_common import BenchCase

__all__ = [
    "BenchResult",
    "Ceilings",
    "Measurement",
    "measure",
    "measure_ceilings",
    "summarize",
    "time_graph_ms",
    "time_ms",
]

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any GPU's L2 (H100: 50 MB), as triton.testing.do_bench
WARMUP_CALLS = 3  # the first call may compile (Triton autotune, torch.compile)
TARGET_TIMING_MS = 500.0  # total time spent on the timed calls of one case
MIN_REPS = 25
MAX_REPS = 1000
GRAPH_TARGET_TIMING_MS = 50.0  # replays of a graph case: each is >= 32 calls (kernels/inference_bench.MIN_GRAPH_CALLS)
MIN_GRAPH_REPS = 10
COPY_CEILING_BYTES = 1024**3  # one 1 GiB tensor copied: read + write
MATMUL_CEILING_N = 8192  # bf16 8192^3 matmul


@dataclass(frozen=True)
class Ceilings:
    """What this GPU does at best, measured in the same run as the kernels."""

    copy_gbps: float  # device-to-device copy, read + write bytes per second / 1e9
    matmul_tflops: float  # bf16 8192^3 torch.matmul


@dataclass(frozen=True)
class Measurement:
    """The raw figures of one case: median milliseconds per call and, if asked for, peak extra memory."""

    ms: float
    peak_mem_mb: float | None = None


@dataclass(frozen=True)
class BenchResult:
    """One row of the results table."""

    kernel: str
    shape: str
    impl: str
    ours: bool
    ms: float
    tflops: float | None
    gbps: float | None
    frac_of_ceiling: float | None  # TFLOP/s over the matmul ceiling, or GB/s over the copy ceiling
    speedup_vs_best_alt: float | None  # best alternative's ms / ours (ours rows with an alternative only)
    peak_mem_mb: float | None
    mem_saving_vs_alt: float | None  # lowest alternative peak / ours (ours rows measured for memory only)


def _median_event_ms(
    run: Callable[[], object],
    before: Callable[[], object] | None = None,
    target_ms: float = TARGET_TIMING_MS,
    min_reps: int = MIN_REPS,
) -> float:
    """Median milliseconds of `run()` between CUDA events (after one timed call sets the repetitions: about
    `target_ms` in all, at least `min_reps`); `before()` runs ahead of each, outside the timed span."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    reps = int(min(MAX_REPS, max(min_reps, target_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if before is not None:
            before()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of one call of `fn` on the current CUDA device, L2 flushed before each call."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    for _ in range(WARMUP_CALLS):
        fn()
    torch.cuda.synchronize()
    return _median_event_ms(fn, before=flush.zero_)


def time_graph_ms(fn: Callable[[], object], calls: int) -> float:
    """Median milliseconds per call of `fn` inside a CUDA graph: `calls` calls captured in one graph, replayed.

    Warm-up calls run first on a side stream (Triton autotunes there; capture forbids syncing), as torch's CUDA-graph
    docs ask. `fn` may allocate: its tensors come from the graph's private pool.
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    return _median_event_ms(graph.replay, target_ms=GRAPH_TARGET_TIMING_MS, min_reps=MIN_GRAPH_REPS) / calls


def _peak_mem_mb(fn: Callable[[], object]) -> float:
    """Peak memory (MiB) that one call allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(case: BenchCase) -> Measurement:
    """Set the case up, time it and (if asked for) measure its peak memory; frees its inputs after."""
    torch.cuda.empty_cache()
    fn = case.setup()
    ms = time_graph_ms(fn, case.graph_calls) if case.graph_calls else time_ms(fn)
    peak = _peak_mem_mb(fn) if case.measure_memory else None
    del fn
    torch.cuda.empty_cache()
    return Measurement(ms=ms, peak_mem_mb=peak)


def measure_ceilings() -> Ceilings:
    """Device copy bandwidth (1 GiB tensor copy) and bf16 8192^3 matmul throughput on the current GPU."""
    src = torch.empty(COPY_CEILING_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    src = dst = None  # free the buffers before the matmul
    n = MATMUL_CEILING_N
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_ms = time_ms(lambda: a @ b)
    return Ceilings(
        copy_gbps=2 * COPY_CEILING_BYTES / (copy_ms * 1e-3) / 1e9,
        matmul_tflops=2 * n**3 / (mm_ms * 1e-3) / 1e12,
    )


def summarize(cases: list[BenchCase], measurements: list[Measurement], ceilings: Ceilings) -> list[BenchResult]:
    """Turn raw timings into rows: throughput, fraction of ceiling, speed-up and memory saving vs alternatives."""
    assert len(cases) == len(measurements), (len(cases), len(measurements))
    groups: dict[tuple[str, str], list[tuple[BenchCase, Measurement]]] = {}
    for case, m in zip(cases, measurements):
        groups.setdefault((case.kernel, case.shape), []).append((case, m))
    results = []
    for case, m in zip(cases, measurements):
        alts = [am for ac, am in groups[(case.kernel, case.shape)] if not ac.ours]
        tflops = case.flops / (m.ms * 1e-3) / 1e12 if case.flops else None
        gbps = case.bytes_moved / (m.ms * 1e-3) / 1e9 if case.bytes_moved else None
        if tflops is not None:
            frac = tflops / ceilings.matmul_tflops
        elif gbps is not None:
            frac = gbps / ceilings.copy_gbps
        else:
            frac = None
        speedup = min(a.ms for a in alts) / m.ms if case.ours and alts else None
        alt_mems = [a.peak_mem_mb for a in alts if a.peak_mem_mb is not None]
        mem_saving = None
        if case.ours and alt_mems and m.peak_mem_mb:
            mem_saving = min(alt_mems) / m.peak_mem_mb
        results.append(
            BenchResult(
                kernel=case.kernel,
                shape=case.shape,
                impl=case.impl,
                ours=case.ours,
                ms=m.ms,
                tflops=tflops,
                gbps=gbps,
                frac_of_ceiling=frac,
                speedup_vs_best_alt=speedup,
                peak_mem_mb=m.peak_mem_mb,
                mem_saving_vs_alt=mem_saving,
            )
        )
    return results
