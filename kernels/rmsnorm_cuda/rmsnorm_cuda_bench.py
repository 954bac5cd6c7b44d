"""Benchmark cases for the CUDA C++ RMSNorm: it and the Triton RMSNorm beside F.rms_norm and torch.compile of it, as lone
calls and, at 16384x384, inside a CUDA graph too (issue 18's fwd+bwd row lost 0.75x as a lone call at 17x its byte
floor: host-bound; the graph twin times the device side, as the compiled trainer would call it)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase, eager_and_compiled, forward_call, graph_twins
from kernels.fused_add_norm import rms_norm
from kernels.rmsnorm_cuda.rmsnorm_cuda import load_extension, rms_norm_cuda

__all__ = ["bench_cases"]

log = logging.getLogger(__name__)

SHAPES = [(65536, 1024), (16384, 384)]  # (rows, C)
GRAPH_SHAPE = "16384x384"  # the shape timed inside a CUDA graph as well
DTYPE = torch.bfloat16
EPS = 1e-6


def eager_rms_norm(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def _setup(make_fn, rows: int, cols: int, backward: bool):
    def setup():
        x = torch.randn(rows, cols, device="cuda", dtype=DTYPE, requires_grad=backward)
        w = torch.randn(cols, device="cuda", dtype=DTYPE, requires_grad=backward)
        return forward_call(make_fn(), (x, w), backward)

    return setup


def bench_cases() -> list[BenchCase]:
    ours = {"triton": lambda: lambda x, w: rms_norm(x, w, EPS)}
    if load_extension() is not None:
        ours = {"cuda c++": lambda: lambda x, w: rms_norm_cuda(x, w, EPS, impl="cuda"), **ours}
    else:
        log.warning("rms_norm: the CUDA extension is not built (kernels/rmsnorm_cuda/build.sh): Triton rows only")
    esize = torch.finfo(DTYPE).bits // 8
    cases = []
    for backward in (False, True):
        for rows, cols in SHAPES:
            # forward: read x, write y. backward: read dy, x; write dx (weight and its grad are negligible).
            bytes_moved = (5 if backward else 2) * rows * cols * esize
            for impl, make_fn in {**ours, **eager_and_compiled(eager_rms_norm)}.items():
                cases.append(
                    BenchCase(
                        kernel="rms_norm fwd+bwd" if backward else "rms_norm fwd",
                        shape=f"{rows}x{cols} bf16",
                        impl=impl,
                        ours=impl in ours,
                        setup=_setup(make_fn, rows, cols, backward),
                        bytes_moved=bytes_moved,
                    )
                )
    return cases + graph_twins([c for c in cases if c.shape.startswith(GRAPH_SHAPE)])
