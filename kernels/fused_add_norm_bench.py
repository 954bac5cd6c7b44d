"""Benchmark cases for the fused add + norm: ours beside eager (add, then F.rms_norm / F.layer_norm) and
torch.compile of that eager code, which fuses it too, at the trainer's shape (shakespeare-char: 64 x 256 rows of
384) and a wide one. The model end to end, kernels on vs off: kernels/fused_add_norm_e2e.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase, eager_and_compiled, forward_call, graph_twins
from kernels.fused_add_norm import add_layer_norm, add_rms_norm

__all__ = ["bench_cases"]

SHAPES = [(65536, 1024), (16384, 384)]  # (rows, C)
TRAIN_ROWS = "16384x384"  # shakespeare-char training: 64 x 256 rows of 384
DTYPE = torch.bfloat16
RMS_EPS, LAYER_EPS = 1e-6, 1e-5


def eager_add_rms_norm(x, residual, weight):
    s = x + residual
    return F.rms_norm(s, (s.shape[-1],), weight, RMS_EPS), s


def eager_add_layer_norm(x, residual, weight, bias):
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, LAYER_EPS), s


def _setup(make_fn, rows: int, cols: int, with_bias: bool, backward: bool):
    def setup():
        make = lambda *shape: torch.randn(*shape, device="cuda", dtype=DTYPE, requires_grad=backward)
        inputs = (make(rows, cols), make(rows, cols), make(cols)) + ((make(cols),) if with_bias else ())
        return forward_call(make_fn(), inputs, backward)

    return setup


def bench_cases() -> list[BenchCase]:
    esize = torch.finfo(DTYPE).bits // 8
    rms = lambda x, r, w: add_rms_norm(x, r, w, RMS_EPS)
    layer = lambda x, r, w, b: add_layer_norm(x, r, w, b, LAYER_EPS)
    variants = [  # (kernel, ours, eager, bias, backward, shapes)
        ("add_rms_norm fwd", rms, eager_add_rms_norm, False, False, SHAPES),
        ("add_rms_norm fwd+bwd", rms, eager_add_rms_norm, False, True, SHAPES),
        ("add_layer_norm fwd", layer, eager_add_layer_norm, True, False, SHAPES),
        ("add_layer_norm fwd+bwd", layer, eager_add_layer_norm, True, True, SHAPES),
    ]
    cases = []
    for kernel, ours_fn, eager_fn, bias, backward, shapes in variants:
        for rows, cols in shapes:
            # forward: read x, residual; write normed, new residual. backward: read dy, dres, s; write ds.
            bytes_moved = (8 if backward else 4) * rows * cols * esize
            impls = {"triton": lambda fn=ours_fn: fn, **eager_and_compiled(eager_fn)}
            for impl, make_fn in impls.items():
                cases.append(
                    BenchCase(
                        kernel=kernel,
                        shape=f"{rows}x{cols} bf16",
                        impl=impl,
                        ours=impl == "triton",
                        setup=_setup(make_fn, rows, cols, bias, backward),
                        bytes_moved=bytes_moved,
                    )
                )
    return cases + graph_twins([c for c in cases if c.shape.startswith(TRAIN_ROWS)])  # the trainer's shape
