"""Benchmark cases for the fused SwiGLU: ours beside eager silu(gate) * up and torch.compile of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase, eager_and_compiled, forward_call
from kernels.swiglu import swiglu

__all__ = ["bench_cases"]

SHAPES = [(65536, 2048)]  # (tokens, hidden)
DTYPE = torch.bfloat16


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def _setup(make_fn, rows: int, cols: int, backward: bool):
    def setup():
        gate, up = (torch.randn(rows, cols, device="cuda", dtype=DTYPE, requires_grad=backward) for _ in range(2))
        return forward_call(make_fn(), (gate, up), backward)

    return setup


def bench_cases() -> list[BenchCase]:
    esize = torch.finfo(DTYPE).bits // 8
    cases = []
    for backward in (False, True):
        for rows, cols in SHAPES:
            # forward: read gate, up; write out. backward: read dout, gate, up; write dgate, dup.
            bytes_moved = (8 if backward else 3) * rows * cols * esize
            impls = {"triton": lambda: swiglu, **eager_and_compiled(eager_swiglu)}
            for impl, make_fn in impls.items():
                cases.append(
                    BenchCase(
                        kernel="swiglu fwd+bwd" if backward else "swiglu fwd",
                        shape=f"{rows}x{cols} bf16",
                        impl=impl,
                        ours=impl == "triton",
                        setup=_setup(make_fn, rows, cols, backward),
                        bytes_moved=bytes_moved,
                    )
                )
    return cases
