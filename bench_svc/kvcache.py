"""Suite `kvcache`: decoding speed against context length, with and without the KV cache.

At each context length L the suite times the decoding of one token two ways on the same model:
- without the cache (the anchor): `GPT.forward` over the whole prefix of L tokens, the last position's logits;
- with the cache: the prefix's first L-1 tokens prefilled once, then `GPT.forward_cached` on the one new token.
It also counts the FLOPs of each (torch's FlopCounterMode, so the speed-up has a measured cause beside the clock)
and checks that both give the same logits. Batch size 1: one stream decoding, as a chat client sees it. Each row
records torch's thread count and the machine's load average: on a shared CPU, clock figures depend on both.
Warm-up never lands in a timed row: before the first row both ways run untimed at the shortest context (the first
calls pay one-off costs: allocator growth, lazy kernel set-up), and each timed function gets WARMUP_CALLS untimed
calls of its own first.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench_svc.model_source import load_bench_model
from bench_svc.provenance import machine_load
from bench_svc.results_io import Anchor, Panel, PlotSpec, write_results
from bench_svc.suite import RateProgress, SuiteContext, SuiteResult
from model.kv_cache import KVCache
from model.transformer import GPT

__all__ = ["NAME", "context_lengths", "run"]

NAME = "kvcache"
MIN_CONTEXT = 16
WARMUP_CALLS = 3  # untimed calls of each timed function, right before it is timed


def context_lengths(block_size: int) -> list[int]:
    """Powers of two from MIN_CONTEXT up to the block size, and the block size itself."""
    lengths = []
    n = MIN_CONTEXT
    while n < block_size:
        lengths.append(n)
        n *= 2
    return lengths + [block_size]


def _warm_up(step: Callable[[], object], calls: int, sync: Callable[[], None]) -> None:
    """`calls` untimed calls: what the first calls of a code path cost is not what decoding a token costs."""
    for _ in range(calls):
        step()
    sync()


def _median_seconds(step: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    """Median seconds of `reps` calls, after WARMUP_CALLS untimed ones."""
    _warm_up(step, WARMUP_CALLS, sync)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(step: Callable[[], object]) -> int:
    """FLOPs of one call, counted op by op. Attention runs on the math backend here, so its matmuls are counted on
    every device (the fused CPU kernel has no FLOP formula in torch), as executed: a full L x S score matrix."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _decode_steps(model: GPT, prefix: torch.Tensor) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """The two ways to decode the token at position L-1 of prefix (1, L): the full-prefix forward and the cached
    step (its cache prefilled with the first L-1 tokens here)."""
    L = prefix.shape[1]
    cache = KVCache(1, model.config, max_len=L, dtype=next(model.parameters()).dtype, device=prefix.device)
    slot = torch.zeros(1, dtype=torch.long, device=prefix.device)
    if L > 1:
        model.forward_cached(prefix[:, :-1], cache, slot, torch.zeros_like(slot))  # prefill L-1 tokens
    start = torch.full_like(slot, L - 1)
    last = prefix[:, -1:]  # (1, 1)

    def full() -> torch.Tensor:
        return model(prefix)[0][:, -1]  # (1, V)

    def cached() -> torch.Tensor:
        # Rewrites position L-1 each time: the same work as decoding a fresh token at context L.
        return model.forward_cached(last, cache, slot, start, kv_len=L, last_only=True)  # (1, V)

    return full, cached


@torch.inference_mode()
def _warm_up_model(model: GPT, prefix: torch.Tensor, sync: Callable[[], None]) -> None:
    """Both ways, untimed, before the first row: the suite's one-off costs are paid here, not by row 1."""
    for step in _decode_steps(model, prefix):
        _warm_up(step, WARMUP_CALLS, sync)


@torch.inference_mode()
def _measure(model: GPT, prefix: torch.Tensor, reps: int, sync: Callable[[], None]) -> dict[str, float]:
    """One context length. prefix (1, L) long; the decoded token is the one at position L-1."""
    L = prefix.shape[1]
    full, cached = _decode_steps(model, prefix)
    max_diff = (full() - cached()).abs().max().item()
    t_full = _median_seconds(full, reps, sync)
    t_cached = _median_seconds(cached, reps, sync)
    flops_full, flops_cached = _flops(full), _flops(cached)
    return {
        "context_len": L,
        "tokens_per_s_no_cache": 1.0 / t_full,
        "tokens_per_s_cached": 1.0 / t_cached,
        "speedup": t_full / t_cached,
        "ms_per_token_no_cache": t_full * 1e3,
        "ms_per_token_cached": t_cached * 1e3,
        "gflop_per_token_no_cache": flops_full / 1e9,
        "gflop_per_token_cached": flops_cached / 1e9,
        "flop_ratio": flops_full / max(flops_cached, 1),
        "max_abs_logit_diff": max_diff,
    }


def run(ctx: SuiteContext) -> SuiteResult:
    """Times and counts decoding at each context length; writes kvcache-<device>.{csv,json,png}."""
    start = time.monotonic()
    bench = load_bench_model(ctx)
    device = torch.device(ctx.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps = 3 if ctx.quick else 20
    lengths = context_lengths(bench.config.block_size)
    generator = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(0, bench.config.vocab_size, (1, L), generator=generator).to(device) for L in lengths]
    _warm_up_model(bench.model, prefixes[0], sync)
    progress = RateProgress(ctx, NAME, len(lengths), unit="length")
    rows = []
    for L, prefix in zip(lengths, prefixes):  # prefix (1, L)
        row = {"model": bench.label, "batch": 1, "threads": torch.get_num_threads(), "load_1m": machine_load()}
        row.update(_measure(bench.model, prefix, reps, sync))
        rows.append(row)
        progress.advance(
            f"context {L}: {row['tokens_per_s_cached']:.0f} tok/s cached, {row['tokens_per_s_no_cache']:.0f} without",
            speedup=row["speedup"],
        )
    longest = rows[-1]
    anchor = Anchor(
        f"no KV cache (full-prefix forward) at context {longest['context_len']}",
        longest["tokens_per_s_no_cache"],
        "tokens/s",
    )
    summary = {
        "model": bench.label,
        "longest_context": longest["context_len"],
        "tokens_per_s_cached": longest["tokens_per_s_cached"],
        "tokens_per_s_no_cache": longest["tokens_per_s_no_cache"],
        "speedup_at_longest": longest["speedup"],
        "flop_ratio_at_longest": longest["flop_ratio"],
    }
    plot = PlotSpec(
        title=f"Decoding with and without the KV cache ({bench.label}, batch 1)",
        x="context_len",
        x_label="context length (tokens)",
        log_x=True,
        panels=(
            Panel(
                "tokens / s",
                (
                    ("tokens_per_s_cached", "KV cache (forward_cached)"),
                    ("tokens_per_s_no_cache", "no cache (full prefix)"),
                ),
                log_y=True,
            ),
            Panel("speed-up (x)", (("speedup", "measured time ratio"), ("flop_ratio", "FLOP ratio")), log_y=True),
        ),
    )
    files = write_results(ctx.out_dir, NAME, ctx.header(anchor), rows, summary=summary, plot=plot)
    return SuiteResult(NAME, "ok", tuple(files), summary, time.monotonic() - start)
