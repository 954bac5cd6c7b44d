"""Benchmark cases of the fused FFN, run by `python -m bench_svc.benches.kernels` (add "kernels.fused_ffn_bench" to BENCH_MODULES).

At M <= 64 rows the FFN reads far more weight bytes than it does FLOPs per byte, so every case is judged in GB/s on
the bytes it must move at least (W1, W2, biases, x in, y out) against the measured copy ceiling, beside the two
PyTorch alternatives at the same shape and dtype: eager (up-projection, GELU, down-projection: three kernels and a
round trip of the (M, hidden) activation through memory) and `torch.compile` of the same function (whose first,
compiling calls fall in the warm-up). GELU is the exact (erf) one, as the GELU presets train with.

Timed as decoding calls it: inside a CUDA graph, each of the three captured the same way, rotating through enough
copies of the weights to leave L2 (kernels/inference_bench.py's helpers, `BenchCase.graph_calls`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase
from kernels.fused_ffn import fused_ffn_triton
from kernels.inference_bench import graph_calls, rotating, rotation_copies

__all__ = ["bench_cases"]

# (name, C, hidden) of the GELU-MLP presets (model/presets.py): nanoGPT's baby GPT and GPT-2 124M.
SHAPES = (("shakespeare-char", 384, 1536), ("gpt2-124m", 768, 3072))
ROWS = (1, 16, 64)  # tokens in flight
DTYPE = torch.bfloat16
ACTIVATION = "gelu"


def _inputs(m: int, c: int, h: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(m, c, device="cuda", dtype=DTYPE)
    w1 = (torch.randn(h, c, device="cuda") / c**0.5).to(DTYPE)
    b1 = (0.1 * torch.randn(h, device="cuda")).to(DTYPE)
    w2 = (torch.randn(c, h, device="cuda") / h**0.5).to(DTYPE)
    b2 = (0.1 * torch.randn(c, device="cuda")).to(DTYPE)
    return x, w1, b1, w2, b2


def _eager(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The model's MLP as eager PyTorch runs it (model/transformer.py MLP with exact GELU)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _setup(impl: str, m: int, c: int, h: int) -> Callable[[], Callable[[], object]]:
    def setup():
        copies = [_inputs(m, c, h) for _ in range(rotation_copies(_bytes_moved(m, c, h)))]
        if impl == "triton":
            fn = lambda *args: fused_ffn_triton(*args, ACTIVATION)  # noqa: E731
        elif impl == "eager":
            fn = _eager
        else:
            fn = torch.compile(_eager, dynamic=False)
        return rotating([lambda args=args: fn(*args) for args in copies])

    return setup


def _bytes_moved(m: int, c: int, h: int) -> int:
    """Weights and biases read once, x read, y written (the hidden activation need not move at all)."""
    return (2 * c * h + h + c + 2 * m * c) * torch.finfo(DTYPE).bits // 8


def bench_cases() -> list[BenchCase]:
    """Fused FFN vs eager and torch.compile at M = 1, 16, 64 (setup allocates on the GPU: call it there only)."""
    cases = []
    for name, c, h in SHAPES:
        for m in ROWS:
            label = f"M{m} {c}->{h}->{c} gelu bf16 ({name})"
            moved = _bytes_moved(m, c, h)
            for impl, ours in (("triton", True), ("eager", False), ("torch.compile", False)):
                setup, calls = _setup(impl, m, c, h), graph_calls(moved)
                cases.append(BenchCase("fused_ffn", label, impl, ours, setup, bytes_moved=moved, graph_calls=calls))
    return cases
