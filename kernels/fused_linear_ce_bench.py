"""Benchmark cases for the fused linear + cross-entropy: ours (chunked, Triton loss kernel) beside F.cross_entropy
on the full logits (bf16 logits, fp32 logits as autocast makes them, and torch.compile), time and peak memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase, forward_call
from kernels.fused_linear_ce import linear_cross_entropy

__all__ = ["bench_cases"]

N_TOKENS, WIDTH, VOCAB = 8192, 768, 50304
DTYPE = torch.bfloat16


def full_logits_ce_bf16(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets)


def full_logits_ce_fp32(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


IMPLS = {
    "chunked triton": lambda: linear_cross_entropy,  # DEFAULT_CHUNK_SIZE rows per chunk
    "F.cross_entropy bf16": lambda: full_logits_ce_bf16,  # bf16 logits
    "F.cross_entropy fp32": lambda: full_logits_ce_fp32,  # fp32 logits, as autocast makes them
    "torch.compile": lambda: torch.compile(full_logits_ce_bf16, dynamic=False),
}


def _setup(make_fn):
    def setup():
        hidden = torch.randn(N_TOKENS, WIDTH, device="cuda", dtype=DTYPE, requires_grad=True)
        weight = (torch.randn(VOCAB, WIDTH, device="cuda") / WIDTH**0.5).to(DTYPE).requires_grad_()
        targets = torch.randint(0, VOCAB, (N_TOKENS,), device="cuda")
        return forward_call(make_fn(), (hidden, weight, targets), backward=True)

    return setup


def bench_cases() -> list[BenchCase]:
    return [
        BenchCase(
            kernel="linear+cross_entropy fwd+bwd",
            shape=f"N{N_TOKENS} C{WIDTH} V{VOCAB} bf16",  # chunk: fused_linear_ce.DEFAULT_CHUNK_SIZE
            impl=impl,
            ours=impl.startswith("chunked"),
            setup=_setup(make_fn),
            flops=3 * 2.0 * N_TOKENS * VOCAB * WIDTH,  # logits, d(hidden), d(weight)
            measure_memory=True,
        )
        for impl, make_fn in IMPLS.items()
    ]
