"""Benchmark cases of the inference kernels, run by `python -m bench_svc.benches.kernels` (`BENCH_MODULES` there).

Both kernels are bound by memory, so they are judged in GB/s against the measured copy ceiling:
- decode attention on the K/V bytes read, beside SDPA with a padded boolean mask over the same cache (given its
  best case: the slots are 0..B-1 so it reads the cache in place, no gather);
- weight-only matmul on the weight + scale bytes read, beside the bf16 matmul (cuBLAS) of the same shape.
Targets: >= 70% of the copy ceiling and faster than the baseline (at tiny shapes launch latency dominates
and neither is near the ceiling; the lm_head and the long contexts are where bandwidth shows).

End to end, decode ms/token of the `large` preset at batch 1 in bf16 / INT8 / INT4 is measured by the model
and serving code (model/quantize.py, bench_svc), not here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase
from kernels.decode_attention import decode_attention_triton
from kernels.quant_format import INT4_GROUP_SIZES, pack_int4, pack_int8
from kernels.wo_matmul import int4_matmul_triton, int8_matmul_triton

__all__ = ["bench_cases"]

HEAD_DIM = 64
N_LAYER = 2  # the cache buffer holds several layers; the kernels read layer 1's strided view
# (batch, context, query heads, KV heads): the targets' two shapes, then the `large` preset's GQA (12 q / 4 kv).
DECODE_SHAPES = ((64, 1024, 6, 6), (1, 8192, 6, 6), (64, 1024, 12, 4))

# (name, K, N) of the linear layers of the 768-wide presets (model/presets.py). `large` (Llama style):
# qkv 768 -> (12 + 2*4) * 64, SwiGLU hidden 2048; `gpt2-124m`: qkv 768 -> 2304, MLP 3072; both: vocab 50304.
MATMUL_SHAPES = (
    ("attn out", 768, 768),
    ("large qkv", 768, 1280),
    ("large mlp up", 768, 2048),
    ("large mlp down", 2048, 768),
    ("gpt2 qkv", 768, 2304),
    ("gpt2 mlp fc", 768, 3072),
    ("gpt2 mlp proj", 3072, 768),
    ("lm_head", 768, 50304),
)
MATMUL_M = (1,)  # every shape at M = 1 (one token in flight) ...
MATMUL_M_EXTRA = ((16, "gpt2 mlp fc"), (64, "gpt2 mlp fc"), (16, "lm_head"), (64, "lm_head"))  # ... and these


def _decode_inputs(batch: int, ctx: int, n_head: int, n_kv: int):
    """q (B, H, D) bf16 and layer 1 of (B, N_LAYER, n_kv, ctx, D) caches, every sequence full (length ctx)."""
    shape = (batch, N_LAYER, n_kv, ctx, HEAD_DIM)
    k_buf = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_buf = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, n_head, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(batch, device="cuda")
    lengths = torch.full((batch,), ctx, device="cuda", dtype=torch.long)
    return q, k_buf[:, 1], v_buf[:, 1], slots, lengths


def _decode_triton(shape: tuple[int, int, int, int]) -> Callable[[], Callable[[], object]]:
    def setup():
        q, k, v, slots, lengths = _decode_inputs(*shape)
        return lambda: decode_attention_triton(q, k, v, slots, lengths)

    return setup


def _decode_sdpa(shape: tuple[int, int, int, int]) -> Callable[[], Callable[[], object]]:
    def setup():
        q, k, v, _, lengths = _decode_inputs(*shape)
        ctx = k.shape[2]
        mask = (torch.arange(ctx, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
        q4 = q[:, :, None, :]  # (B, H, 1, D)
        gqa = q.shape[1] != k.shape[1]
        return lambda: F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, enable_gqa=gqa)

    return setup


def _decode_cases() -> list[BenchCase]:
    cases = []
    for shape in DECODE_SHAPES:
        batch, ctx, n_head, n_kv = shape
        label = f"B{batch} ctx{ctx} H{n_head}/KV{n_kv} D{HEAD_DIM} bf16"
        kv_bytes = 2 * batch * n_kv * ctx * HEAD_DIM * 2  # K and V, 2 bytes each
        cases.append(BenchCase("decode_attention", label, "triton", True, _decode_triton(shape), bytes_moved=kv_bytes))
        cases.append(
            BenchCase("decode_attention", label, "sdpa padded mask", False, _decode_sdpa(shape), bytes_moved=kv_bytes)
        )
    return cases


def _matmul_setup(m: int, k: int, n: int, fmt: str) -> Callable[[], Callable[[], object]]:
    """fmt: "bf16", "int8" or "int4-g<group size>"."""

    def setup():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") / k**0.5
        if fmt == "bf16":
            wt = w.bfloat16()
            return lambda: x @ wt.T
        if fmt == "int8":
            q, scale = pack_int8(w)
            return lambda: int8_matmul_triton(x, q, scale)
        group_size = int(fmt.removeprefix("int4-g"))
        packed, scales = pack_int4(w, group_size)
        return lambda: int4_matmul_triton(x, packed, scales, group_size)

    return setup


def _weight_bytes(k: int, n: int, fmt: str) -> int:
    if fmt == "bf16":
        return 2 * n * k
    if fmt == "int8":
        return n * k + 4 * n
    group_size = int(fmt.removeprefix("int4-g"))
    return n * k // 2 + 4 * n * (k // group_size)


def _matmul_cases() -> list[BenchCase]:
    runs = [(m, name) for name, _, _ in MATMUL_SHAPES for m in MATMUL_M] + list(MATMUL_M_EXTRA)
    dims = {name: (k, n) for name, k, n in MATMUL_SHAPES}
    fmts = ["int8", *(f"int4-g{g}" for g in INT4_GROUP_SIZES)]
    cases = []
    for m, name in runs:
        k, n = dims[name]
        label = f"M{m} {k}->{n} ({name})"
        for fmt in fmts:
            cases.append(
                BenchCase(
                    "wo_matmul",
                    label,
                    f"triton {fmt}",
                    True,
                    _matmul_setup(m, k, n, fmt),
                    bytes_moved=_weight_bytes(k, n, fmt),
                )
            )
        cases.append(
            BenchCase(
                "wo_matmul",
                label,
                "torch bf16 matmul",
                False,
                _matmul_setup(m, k, n, "bf16"),
                bytes_moved=_weight_bytes(k, n, "bf16"),
            )
        )
    return cases


def bench_cases() -> list[BenchCase]:
    """Decode attention and weight-only matmul cases (setup allocates on the GPU, so only call them there)."""
    return _decode_cases() + _matmul_cases()
