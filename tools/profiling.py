"""Reading a torch.profiler capture for the probes (tools/train_probe.py, tools/serve_probe.py) and the kernel
benchmarks: the kernels it saw, the time the GPU was busy, the largest kernels and host ops, the kernels a captured
call launches."""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["busy_us", "format_top", "graph_kernels", "kernel_events", "replay_kernels", "top_host", "top_kernels"]


def kernel_events(prof, skip_prefixes: tuple[str, ...] = ()) -> list:
    """The CUDA kernels of a capture (not memcpy markers with '#', nor ranges named with `skip_prefixes`)."""
    return [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and "#" not in e.name
        and not e.name.startswith(skip_prefixes)
    ]


def replay_kernels(graph: torch.cuda.CUDAGraph, replays: int = 10) -> list:
    """The kernels of `replays` replays of a captured CUDA graph, under torch.profiler (per replay: len / replays)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return kernel_events(prof)


def graph_kernels(fn) -> int:
    """CUDA kernels in one replay of a graph holding one call of fn (what a captured decode step launches; the kernel
    benchmarks' count)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return len(replay_kernels(graph, 1))


def busy_us(kernels: list) -> float:
    """Union of the kernels' [start, end) intervals, in microseconds."""
    busy, end = 0.0, float("-inf")
    for s, e in sorted((k.time_range.start, k.time_range.end) for k in kernels):
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy


def top_kernels(kernels: list, per: int, n: int = 8, width: int = 48) -> list[tuple[str, float]]:
    """The n kernels (names cut to `width`) with the most device time: (name, microseconds per `per`)."""
    by_name: Counter = Counter()
    for e in kernels:
        by_name[e.name[:width]] += e.device_time
    return [(name, t / per) for name, t in by_name.most_common(n)]


def format_top(pairs: list[tuple[str, float]]) -> str:
    """`top_kernels` / `top_host` as one line: "name 12.3us, ..."."""
    return ", ".join(f"{name} {us:.1f}us" for name, us in pairs)


def top_host(prof, per: int, n: int = 10, width: int = 36) -> list[tuple[str, float]]:
    """The n host ops with the most self CPU time: (name, microseconds per `per`)."""
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [(e.key[:width], e.self_cpu_time_total / per) for e in ops]
