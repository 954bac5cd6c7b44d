"""Benchmark cases for flash attention: ours beside PyTorch SDPA (FlashAttention-2 / cuDNN / efficient backends).

Training shapes run forward + backward, long-context shapes forward only; causal, bf16, as the GPT trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase, forward_call
from kernels.flash_attention import flash_attention

__all__ = ["bench_cases"]

TRAIN_SHAPES = [(64, 6, 256, 64), (16, 12, 1024, 64)]  # (B, H, T, D): forward + backward
FORWARD_SHAPES = [(4, 16, 4096, 64), (1, 16, 16384, 64)]  # forward only
DTYPE = torch.bfloat16
BACKWARD_FLOP_RATIO = 2.5  # the backward does 2.5x the forward's matmul work (5 matmuls to 2)

IMPLS = {
    "triton": (True, lambda q, k, v: flash_attention(q, k, v, causal=True)),
    "sdpa": (False, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
}


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, backward: bool) -> float:
    """Matmul flops: QK^T and PV are 2*T*T*D each per head; causal does half; backward 2.5x more."""
    flops = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return flops * (1.0 + BACKWARD_FLOP_RATIO) if backward else flops


def _setup(fn, B: int, H: int, T: int, D: int, backward: bool):
    def setup():
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, requires_grad=backward) for _ in range(3))
        return forward_call(fn, (q, k, v), backward)

    return setup


def bench_cases() -> list[BenchCase]:
    cases = []
    for shapes, backward, kernel in [
        (TRAIN_SHAPES, True, "flash_attention fwd+bwd"),
        (FORWARD_SHAPES, False, "flash_attention fwd"),
    ]:
        for B, H, T, D in shapes:
            for impl, (ours, fn) in IMPLS.items():
                cases.append(
                    BenchCase(
                        kernel=kernel,
                        shape=f"B{B} H{H} T{T} D{D} causal bf16",
                        impl=impl,
                        ours=ours,
                        setup=_setup(fn, B, H, T, D, backward),
                        flops=attention_flops(B, H, T, D, causal=True, backward=backward),
                    )
                )
    return cases
