"""GPU benchmark of the full sampler: the PyTorch path (`model.sampling.sample_slots_reference`: sort, cumsum, searchsorted, the
int64 hash) against the one-launch Triton kernel, both captured in CUDA graphs as the serving engine's decode step
captures them. `python -m kernels.sampling_bench` prints, per (B, V, settings): kernels per replay (torch.profiler),
ms per call (`time_graph_ms`: CALLS calls in one graph, replayed), the speed-up, and how many rows' tokens agree.

Settings: "serve" is the issue's sampled target (temperature 0.8, top-k 50, top-p 0.95; repetition penalty 1.1 on
half the rows, 10% of each row's ids seen); "top-p" has top-k off (the kernel's slowest case: every cut is a
search over all V tokens); "greedy" rows only (the kernel stops after its first pass).
"""

from __future__ import annotations

import argparse

import torch

from bench_svc.benches.kernel_timing import time_graph_ms
from kernels.sampling import SlotSettings, sample_slots_triton
from model.sampling import sample_slots_reference as reference
from tools.profiling import graph_kernels

__all__ = ["main"]

BATCHES = (1, 64, 256)
VOCABS = (65, 50304)
SETTINGS = ("serve", "top-p", "greedy")
CALLS = 10  # calls per captured graph
LOGIT_SCALE = 3.0  # logits ~ N(0, 3^2): a spread like a trained model's


def _inputs(B: int, V: int, setting: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """logits (B, V), slots, counters and the slots' settings, on the GPU."""
    n = B + 1
    sampled = setting != "greedy"
    settings = SlotSettings(
        blocked=torch.zeros(V, dtype=torch.bool),
        seen=torch.rand(n, V, generator=gen) < 0.1,
        penalty=torch.where(torch.arange(n) % 2 == 0, 1.1, 1.0)[:, None],
        greedy=torch.full((n,), not sampled),
        temperature=torch.full((n, 1), 0.8),
        top_k=torch.full((n, 1), 50 if setting == "serve" else V),
        top_p=torch.full((n, 1), 0.95),
        seed=torch.randint(0, 1 << 62, (n,), generator=gen),
    )
    settings = SlotSettings(*(t.cuda() for t in settings))
    logits = (LOGIT_SCALE * torch.randn(B, V, generator=gen)).cuda()
    slots = torch.randperm(n, generator=gen)[:B].cuda()
    counters = torch.randint(0, 1 << 20, (B,), generator=gen).cuda()
    return logits, slots, counters, settings


def _row(B: int, V: int, setting: str, gen: torch.Generator) -> dict:
    logits, slots, counters, settings = _inputs(B, V, setting, gen)
    torch_fn = lambda: reference(logits, slots, counters, settings)  # noqa: E731
    triton_fn = lambda: sample_slots_triton(logits, slots, counters, settings)  # noqa: E731
    agree = int((torch_fn() == triton_fn()).sum())  # the first kernel call autotunes, outside any capture
    torch.cuda.synchronize()
    row = dict(B=B, V=V, setting=setting, agree=f"{agree}/{B}")
    for name, fn in (("torch", torch_fn), ("triton", triton_fn)):
        row[f"{name}_kernels"] = graph_kernels(fn)
        row[f"{name}_ms"] = time_graph_ms(fn, CALLS)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated B values")
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="comma-separated V values")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {SETTINGS}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.sampling_bench needs a CUDA GPU")
    settings = args.settings.split(",")
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: {s!r} is not one of {SETTINGS}")
    gen = torch.Generator().manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {CALLS} calls per CUDA graph")
    head = f"{'B':>4} {'V':>6} {'setting':>7} | {'torch k':>7} {'torch ms':>9} | {'triton k':>8} {'triton ms':>9}"
    print(head + f" | {'speed-up':>8} {'agree':>9}")
    for V in (int(v) for v in args.vocabs.split(",")):
        for B in (int(b) for b in args.batches.split(",")):
            for setting in settings:
                r = _row(B, V, setting, gen)
                print(
                    f"{B:>4} {V:>6} {setting:>7} | {r['torch_kernels']:>7} {r['torch_ms']:>9.4f} | "
                    f"{r['triton_kernels']:>8} {r['triton_ms']:>9.4f} | {r['torch_ms'] / r['triton_ms']:>7.2f}x "
                    f"{r['agree']:>9}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
