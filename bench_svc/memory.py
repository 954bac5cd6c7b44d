"""Suite `memory`: peak memory against sequence length, for a forward pass and for forward + backward.

Peak memory is measured above what was allocated before the pass (the weights), so it is what the pass itself
needs: activations, logits, and for training the gradients too. On a GPU it is `torch.cuda.max_memory_allocated`;
on a CPU it is the running sum of every allocation and free that torch's profiler records (`profile_memory`),
which sees torch's own allocator (tracemalloc does not).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench_svc.kvcache import context_lengths
from bench_svc.model_source import load_bench_model
from bench_svc.results_io import Anchor, Panel, PlotSpec, write_results
from bench_svc.suite import RateProgress, SuiteContext, SuiteResult
from model.transformer import GPT

__all__ = ["NAME", "peak_bytes", "run"]

NAME = "memory"
MIB = 2**20


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of `fn()` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each "[memory]" record is one allocation (+bytes) or free (-bytes); the peak of their running sum is the
    # pass's peak. Frees of memory allocated before the pass can only lower the sum, never raise the peak.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for record in records:
        current += record.nbytes()
        peak = max(peak, current)
    return peak


def _forward(model: GPT, idx: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        with torch.no_grad():
            model(idx)  # logits (B, T, V)

    return step


def _train_step(model: GPT, idx: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, idx)
        loss.backward()

    return step


def run(ctx: SuiteContext) -> SuiteResult:
    """Measures both passes at each sequence length; writes memory-<device>.{csv,json,png}."""
    start = time.monotonic()
    bench = load_bench_model(ctx)
    device = torch.device(ctx.device)
    model = bench.model
    batch = 2 if ctx.quick else 8
    lengths = context_lengths(bench.config.block_size)
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    generator = torch.Generator().manual_seed(0)
    progress = RateProgress(ctx, NAME, len(lengths), unit="length")
    rows = []
    for T in lengths:
        idx = torch.randint(0, bench.config.vocab_size, (batch, T), generator=generator).to(device)  # (B, T)
        _forward(model, idx)()  # warm-up: one-time allocations (kernels, caches) stay out of the figures
        forward = peak_bytes(_forward(model, idx), device) / MIB
        train = peak_bytes(_train_step(model, idx), device) / MIB
        model.zero_grad(set_to_none=True)
        rows.append(
            {
                "model": bench.label,
                "batch": batch,
                "seq_len": T,
                "params_mib": params_mib,
                "forward_peak_mib": forward,
                "train_peak_mib": train,
                "train_over_forward": train / forward if forward else float("nan"),
            }
        )
        progress.advance(f"seq {T}: forward {forward:.1f} MiB, forward+backward {train:.1f} MiB")
    longest = rows[-1]
    anchor = Anchor(
        f"forward only (no grad) at seq {longest['seq_len']}, batch {batch}", longest["forward_peak_mib"], "MiB"
    )
    summary = {
        "model": bench.label,
        "batch": batch,
        "longest_seq": longest["seq_len"],
        "params_mib": params_mib,
        "forward_peak_mib": longest["forward_peak_mib"],
        "train_peak_mib": longest["train_peak_mib"],
    }
    plot = PlotSpec(
        title=f"Peak memory above the weights ({bench.label}, batch {batch})",
        x="seq_len",
        x_label="sequence length (tokens)",
        log_x=True,
        panels=(
            Panel("peak MiB", (("forward_peak_mib", "forward (no grad)"), ("train_peak_mib", "forward + backward"))),
        ),
    )
    files = write_results(ctx.out_dir, NAME, ctx.header(anchor), rows, summary=summary, plot=plot)
    return SuiteResult(NAME, "ok", tuple(files), summary, time.monotonic() - start)
