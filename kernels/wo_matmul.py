"""Weight-only quantized matmul for decoding: y = x @ dequant(w).T with INT8 or INT4 weights.

At decode time M (tokens in flight) is small (1..64) and a linear layer is bound by reading its weight,
so storing it in 8 or 4 bits reads 2x or 4x fewer bytes than bf16. The Triton kernels here load the
packed weight tile, dequantise it in registers (gpt-fast / llama.cpp style) and feed `tl.dot`; the
full-precision weight never exists in memory. Layout: `kernels/quant_format.py`.

Per kernel:
    int8_matmul_reference / int4_matmul_reference   dequantise-then-matmul in PyTorch (the truth)
    int8_matmul_triton    / int4_matmul_triton      the fused Triton kernels (any M; meant for M <= 64)
    int8_matmul           / int4_matmul             wrappers, x (..., K); impl="auto" (Triton for CUDA
                                                    inputs with M <= 64, the reference otherwise: CPU,
                                                    or prefill-sized M where dequantise + cuBLAS wins),
                                                    "triton" or "reference" (kernels/dispatch.py)

Few output tiles (small N, tiny M) would leave most SMs idle, so the kernels split K across programs
(split-K) into an fp32 partial buffer summed afterwards: deterministic, unlike atomics.

Targets (measured by `kernels/inference_bench.py` at M = 1, 16, 64 on the `large` and `gpt2-124m`
widths): >= 70% of measured copy bandwidth on weight bytes where the weight is large enough to leave
launch overhead behind (the lm_head), and faster than the bf16 matmul of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.dispatch import Impl, num_sms, use_triton
from kernels.quant_format import check_group_size, unpack_int4, unpack_int8

__all__ = [
    "MAX_FUSED_M",
    "int8_matmul",
    "int8_matmul_reference",
    "int8_matmul_triton",
    "int4_matmul",
    "int4_matmul_reference",
    "int4_matmul_triton",
]

MAX_FUSED_M = 64  # above this the wrappers dequantise and call cuBLAS
_TARGET_PROGRAMS_PER_SM = 2  # split K until the grid has about this many programs per SM
_MAX_SPLIT_K = 16


@dataclass(frozen=True)
class _Config:
    """Launch configuration of one matmul: tile sizes, split-K and warps."""

    block_m: int
    block_n: int
    block_k: int
    k_per_split: int  # a multiple of block_k
    split_k: int  # cdiv(K, k_per_split): every split gets at least one K tile
    num_warps: int
    num_stages: int


def _pick_config(m: int, n: int, k: int, block_k: int, num_sms: int, split_k: int | None) -> _Config:
    """Tiles for small M: one 16..64-row M tile, 64-wide N tiles, split-K to fill the SMs."""
    block_m = max(16, triton.next_power_of_2(min(m, MAX_FUSED_M)))
    block_n = 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = 1
        while split_k * 2 <= min(_MAX_SPLIT_K, k_blocks) and tiles * split_k * 2 <= _TARGET_PROGRAMS_PER_SM * num_sms:
            split_k *= 2
    if not 1 <= split_k <= k_blocks:
        raise ValueError(f"split_k must be in 1..{k_blocks} for K={k}, got {split_k}")
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    return _Config(block_m, block_n, block_k, k_per_split, triton.cdiv(k, k_per_split), num_warps=4, num_stages=3)


def dot_args(t: torch.Tensor) -> dict:
    """DOT_DTYPE and DOT_PRECISION constexprs of a kernel's `tl.dot`s for input `t`: t's own dtype on the GPU
    (fp32 exact, no TF32); fp32 under the CPU interpreter, whose bf16 `tl.dot` multiplies the raw uint16 bits
    (triton 3.7.1). Shared with kernels/decode_attention.py."""
    if not t.is_cuda or t.dtype == torch.float32:
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    return dict(DOT_DTYPE=tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float16, DOT_PRECISION="tf32")


@triton.jit
def _tile(M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output rows and columns (grid: N tiles, M tiles, K splits) and its K range [start, end)."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * K_PER_SPLIT
    return offs_m, offs_n, offs_m < M, offs_n < N, k_start, tl.minimum(k_start + K_PER_SPLIT, K)


@triton.jit
def _store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on):
    """acc (BM, BN) into out[split] (S, M, N): the output itself when K is not split, else fp32 partials."""
    out_ptrs = out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,  # x (M, K), w int8 (N, K), scale fp32 (N,), out (S, M, N)
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_os,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_m, offs_n, m_mask, n_mask, k_start, k_end = _tile(M, N, K, K_PER_SPLIT, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # (BM, BK)
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0,
        )  # (BK, BN) int8
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    # The per-channel scale is constant along K, so it is applied once to the integer-weight sums.
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)  # (BN,)
    acc = acc * scale[None, :]
    _store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on)


@triton.jit
def _int4_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,  # x (M, K), w uint8 (N, K//2), scales fp32 (N, K//G), out (S, M, N)
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_os,
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE  # whole groups per K tile
    offs_m, offs_n, m_mask, n_mask, k_start, k_end = _tile(M, N, K, K_PER_SPLIT, BLOCK_M, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile holds k = 2j (low) and 2j + 1 (high)
    offs_g = tl.arange(0, GROUPS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_even = k0 + 2 * offs_j  # (BK/2,)
        k_mask = k_even < k_end
        x_mask = m_mask[:, None] & k_mask[None, :]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + k_even[None, :] * stride_xk
        x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)  # (BM, BK/2)
        x_odd = tl.load(x_ptrs + stride_xk, mask=x_mask, other=0.0)  # (BM, BK/2)
        b = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + (k0 // 2 + offs_j)[:, None] * stride_wk,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0,
        )  # (BK/2, BN) uint8
        g = k0 // GROUP_SIZE + offs_g
        s = tl.load(
            scale_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg,
            mask=(g * GROUP_SIZE < k_end)[:, None] & n_mask[None, :],
            other=0.0,
        )  # (GROUPS, BN)
        # Dequantise in registers: (u - 8) * scale of the element's group, then the input dtype.
        lo = ((b & 0xF).to(tl.int32) - 8).to(tl.float32)
        hi = ((b >> 4).to(tl.int32) - 8).to(tl.float32)
        lo = tl.reshape(tl.reshape(lo, (GROUPS, GROUP_SIZE // 2, BLOCK_N)) * s[:, None, :], (BLOCK_K // 2, BLOCK_N))
        hi = tl.reshape(tl.reshape(hi, (GROUPS, GROUP_SIZE // 2, BLOCK_N)) * s[:, None, :], (BLOCK_K // 2, BLOCK_N))
        acc += tl.dot(x_even.to(DOT_DTYPE), lo.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        acc += tl.dot(x_odd.to(DOT_DTYPE), hi.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    _store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on)


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape (M, K) with K={k}, got {tuple(x.shape)}")


def _launch(
    kernel,
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    scale_strides: tuple[int, ...],
    n: int,
    k: int,
    cfg: _Config,
    **constexprs,
) -> torch.Tensor:
    """Run one kernel over a (N tiles, M tiles, K splits) grid; sum the partials when K is split."""
    m = x.shape[0]
    out_dtype = x.dtype if cfg.split_k == 1 else torch.float32
    out = torch.empty((cfg.split_k, m, n), device=x.device, dtype=out_dtype)  # (S, M, N)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    kernel[grid](
        x,
        w,
        scale,
        out,
        m,
        n,
        k,
        cfg.k_per_split,
        *x.stride(),
        *w.stride(),
        *scale_strides,
        *out.stride(),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        **dot_args(x),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **constexprs,
    )
    return out[0] if cfg.split_k == 1 else out.sum(dim=0).to(x.dtype)  # (M, N)


def int8_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ dequant(q, scale).T -> (M, N) in x's dtype: dequantise, then a plain matmul."""
    return x @ unpack_int8(q, scale).to(x.dtype).T


def int4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) @ dequant(packed, scales).T -> (M, N) in x's dtype: dequantise, then a plain matmul."""
    return x @ unpack_int4(packed, scales, group_size).to(x.dtype).T


def int8_matmul_triton(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, split_k: int | None = None
) -> torch.Tensor:
    """The fused Triton INT8 kernel: x (M, K), q int8 (N, K), scale fp32 (N,) -> (M, N)."""
    n, k = q.shape
    _check_x(x, k)
    assert q.dtype == torch.int8 and scale.shape == (n,) and scale.dtype == torch.float32
    cfg = _pick_config(x.shape[0], n, k, 128, num_sms(x.device), split_k)
    # Per-channel scales are contiguous (N,): the kernel takes no strides for them.
    return _launch(_int8_matmul_kernel, x, q, scale.contiguous(), (), n, k, cfg)


def int4_matmul_triton(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, *, split_k: int | None = None
) -> torch.Tensor:
    """The fused Triton INT4 kernel: x (M, K), packed uint8 (N, K//2), scales fp32 (N, K//G) -> (M, N)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    check_group_size(group_size, k)
    _check_x(x, k)
    assert packed.dtype == torch.uint8 and scales.shape == (n, k // group_size)
    assert scales.dtype == torch.float32
    cfg = _pick_config(x.shape[0], n, k, max(group_size, 128), num_sms(x.device), split_k)
    return _launch(_int4_matmul_kernel, x, packed, scales, scales.stride(), n, k, cfg, GROUP_SIZE=group_size)


def _fused(impl: Impl, x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """ "auto" fuses on CUDA for M <= MAX_FUSED_M only: larger M is compute-bound, where cuBLAS wins."""
    return use_triton(impl, x, *weights) and (impl == "triton" or x.shape[0] <= MAX_FUSED_M)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """x (..., K) @ dequant(q int8 (N, K), scale (N,)).T -> (..., N) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if _fused(impl, x2, q, scale):
        y = int8_matmul_triton(x2, q, scale)
    else:
        y = int8_matmul_reference(x2, q, scale)
    return y.reshape(*x.shape[:-1], q.shape[0])


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, *, impl: Impl = "auto"
) -> torch.Tensor:
    """x (..., K) @ dequant(packed uint8 (N, K//2), scales (N, K//G)).T -> (..., N) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if _fused(impl, x2, packed, scales):
        y = int4_matmul_triton(x2, packed, scales, group_size)
    else:
        y = int4_matmul_reference(x2, packed, scales, group_size)
    return y.reshape(*x.shape[:-1], packed.shape[0])
