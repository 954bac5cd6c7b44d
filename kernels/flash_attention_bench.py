"""Benchmark cases for flash attention: ours beside PyTorch SDPA (FlashAttention-2 / cuDNN / efficient backends).

`python -m kernels.flash_attention_bench` (GPU) prints where the time of one training-shape call goes: host time to
enqueue it, device time of its kernels (torch.profiler) and the kernels launched, ours beside SDPA's; then the way
our backward took dQ at each key (atomics or its own programs, timed in CUDA graphs) and the configs the tuner kept.

Training shapes run forward + backward, without dropout and with the shakespeare-char preset's dropout 0.2 (which
the model's training path now sends to our kernel); long-context shapes forward only; causal, bf16, as the GPT
trains. `sdpa` is SDPA's own backend choice; `sdpa flash` pins its FlashAttention-2 backend. With dropout, SDPA runs
the backends the model allows it with dropout (model.layers.DROPOUT_SDPA_BACKENDS: FlashAttention-2 first).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import flash_attention as fa
from kernels.bench_common import BenchCase, forward_call, graph_twins
from kernels.flash_attention import flash_attention

__all__ = ["bench_cases", "profile_training_shapes"]

TRAIN_SHAPES = [(64, 6, 256, 64), (16, 12, 1024, 64)]  # (B, H, T, D): forward + backward
FORWARD_SHAPES = [(4, 16, 4096, 64), (1, 16, 16384, 64)]  # forward only
DTYPE = torch.bfloat16
TRAIN_DROPOUT = 0.2  # the shakespeare-char preset's
BACKWARD_FLOP_RATIO = 2.5  # the backward does 2.5x the forward's matmul work (5 matmuls to 2)
# the SDPA backends model.layers allows with dropout (cuDNN's trains wrongly with dropout there)
DROPOUT_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(backends: list[SDPBackend] | None, dropout_p: float):
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if backends is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)

    return run


def _ours(dropout_p: float):
    return lambda q, k, v: flash_attention(q, k, v, causal=True, dropout_p=dropout_p)


# (kernel name, shapes, backward, {impl: (ours, fn)}); the kernel names of the rows without dropout are the
# ones earlier reports used, so their figures stay comparable
GROUPS = [
    (
        "flash_attention fwd+bwd",
        TRAIN_SHAPES,
        True,
        {
            "triton": (True, _ours(0.0)),
            "sdpa": (False, _sdpa(None, 0.0)),
            "sdpa flash": (False, _sdpa([SDPBackend.FLASH_ATTENTION], 0.0)),
        },
    ),
    (
        f"flash_attention fwd+bwd dropout {TRAIN_DROPOUT}",
        TRAIN_SHAPES,
        True,
        {
            "triton": (True, _ours(TRAIN_DROPOUT)),
            "sdpa": (False, _sdpa(DROPOUT_SDPA_BACKENDS, TRAIN_DROPOUT)),
        },
    ),
    (
        "flash_attention fwd",
        FORWARD_SHAPES,
        False,
        {"triton": (True, _ours(0.0)), "sdpa": (False, _sdpa(None, 0.0))},
    ),
]


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
    for kernel, shapes, backward, impls in GROUPS:
        for B, H, T, D in shapes:
            for impl, (ours, fn) in impls.items():
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
    return cases + graph_twins([c for c in cases if "bwd" in c.kernel])


PROFILE_CALLS = 20


def _profile_one(call) -> tuple[float, float, list[str]]:
    """(host µs to enqueue one call, device µs of its kernels, kernel names) of `call`, after warm-up."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(PROFILE_CALLS):
        call()
    host_us = (time.perf_counter() - start) / PROFILE_CALLS * 1e6
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_CALLS):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.device_time for e in kernels) / PROFILE_CALLS
    names = sorted({e.name[:60] for e in kernels})
    return host_us, device_us, names


def profile_training_shapes() -> None:
    """Prints, per training shape and impl (with and without dropout): host enqueue µs, device µs, kernels."""
    print(f"{'case':<58} {'host us':>8} {'device us':>10}  kernels")
    for kernel, shapes, backward, impls in GROUPS:
        if not backward:
            continue
        for B, H, T, D in shapes:
            for impl, (_, fn) in impls.items():
                host_us, device_us, names = _profile_one(_setup(fn, B, H, T, D, backward)())
                case = f"{kernel} B{B} H{H} T{T} {impl}"
                print(f"{case:<58} {host_us:>8.1f} {device_us:>10.1f}  {', '.join(names)}")
    print_tuning()


def print_tuning() -> None:
    """The backward's dQ way per key and the config each autotuned kernel kept, as chosen in this process."""
    for (t_bucket, dtype, head_dim, causal, dropout), atomic in fa._DQ_ATOMIC.items():
        way = "atomics" if atomic else "own programs"
        print(f"backward T<={t_bucket} {dtype} D{head_dim} causal={causal} dropout={dropout}: dQ by {way}")
    names = {id(fa._attn_fwd_tuned): "fwd", id(fa._attn_bwd_tuned): "bwd", id(fa._attn_bwd_atomic_tuned): "bwd atomic"}
    for (tuned, t_bucket, dtype, *meta), config in fa._TUNED.items():
        print(f"{names[id(tuned)]:<10} T<={t_bucket} {dtype} {dict(meta)}: {config}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("kernels.flash_attention_bench profiles on a CUDA GPU; this machine has none")
    profile_training_shapes()
