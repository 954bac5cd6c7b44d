"""Fused feed-forward block for small batches: y = act(x @ W1.T + b1) @ W2.T + b2 in one Triton kernel.

At decode time M (tokens in flight) is 1..64, so the two linear layers of a GELU MLP are bound by reading their
weights; eager PyTorch runs three kernels (up-projection, activation, down-projection) and writes the (M, hidden)
activation to global memory and reads it back. Here each program owns a slice of the hidden dimension: it computes
its (M, BLOCK_H) tile of the activation in registers (the first GEMM loops over C), applies the activation there,
and multiplies the tile straight into W2's matching columns (the second GEMM loops over the C outputs). Every weight
byte is read once across the grid and the hidden activation never reaches global memory; each hidden slice leaves an
fp32 (M, C) partial sum, and one small second kernel sums the partials and casts (deterministic, unlike atomics):
two launches in all against eager's three, which is what counts inside a CUDA graph at these sizes.

Activations (`ACTIVATIONS`): "gelu" is the exact, erf-based GELU (what `model/layers.py` and GPT-2/nanoGPT train
with); "gelu_tanh" is the tanh approximation (`F.gelu(approximate="tanh")`); "relu"; "silu".
Inference only (no autograd). Weights use nn.Linear's layout: W1 (H, C), W2 (C, H). The block-size heuristic is
untuned; `kernels/fused_ffn_bench.py` times it inside a CUDA graph beside eager and torch.compile captured the same
way. It stays off by default (nothing in the model calls it) unless that table shows it faster.

    reference          fp32 PyTorch (the truth), output in x's dtype
    fused_ffn_triton   the fused kernel, x (M, C), any M (meant for M <= MAX_FUSED_M)
    fused_ffn          wrapper, x (..., C); impl="auto" runs Triton for CUDA inputs with M <= MAX_FUSED_M and the
                       reference otherwise (CPU, prefill-sized M), "triton" or "reference" (kernels/dispatch.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import Impl, num_sms, use_triton
from kernels.wo_matmul import dot_args

__all__ = ["ACTIVATIONS", "MAX_FUSED_M", "fused_ffn", "fused_ffn_triton", "reference"]

ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "relu", "silu")
MAX_FUSED_M = 64  # above this the weights are re-read per row tile and two cuBLAS GEMMs are the better choice
BLOCK_C = 64  # C tile of both GEMMs: the reduction tile of the first, the output tile of the second
BLOCK_H_CHOICES = (16, 32, 64, 128)  # hidden slice per program, smallest first (more programs)
# The partial sums cost 2 * (H / BLOCK_H) * M * C * 4 bytes (written, read back): BLOCK_H keeps them under this share
# of the weight bytes, and is otherwise the largest whose grid still fills every SM (else the smallest allowed).
PARTIAL_BYTES_BUDGET = 0.25
NUM_WARPS = 4
NUM_STAGES = 2
SUM_BLOCK = 1024  # output elements per program of the partial-sum kernel


@dataclass(frozen=True)
class _Config:
    """Launch configuration: row tile, hidden slice and the number of hidden slices (the partial sums)."""

    block_m: int
    block_h: int
    splits: int


def _pick_config(m: int, c: int, h: int, weight_bytes: int, sms: int, block_h: int | None) -> _Config:
    block_m = max(16, triton.next_power_of_2(min(m, MAX_FUSED_M)))
    m_tiles = triton.cdiv(m, block_m)
    if block_h is None:
        # Partial bytes shrink as BLOCK_H grows, so the choices within budget are a suffix of BLOCK_H_CHOICES.
        fits = [b for b in BLOCK_H_CHOICES if 2 * triton.cdiv(h, b) * m * c * 4 <= PARTIAL_BYTES_BUDGET * weight_bytes]
        filling = [b for b in fits if triton.cdiv(h, b) * m_tiles >= sms]
        block_h = filling[-1] if filling else (fits[0] if fits else BLOCK_H_CHOICES[-1])
    if block_h not in BLOCK_H_CHOICES:
        raise ValueError(f"block_h must be one of {BLOCK_H_CHOICES}, got {block_h}")
    return _Config(block_m=block_m, block_h=block_h, splits=triton.cdiv(h, block_h))


@triton.jit
def _activate(h, ACTIVATION: tl.constexpr):
    """act(h) for an fp32 tile; act(0) == 0 for all four, so masked-out hidden columns stay zero."""
    if ACTIVATION == "gelu":
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))  # x * Phi(x), Phi via erf
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2/pi) * (x + 0.044715 x^3)
        out = 0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1
    elif ACTIVATION == "relu":
        out = tl.maximum(h, 0.0)
    else:
        out = h * tl.sigmoid(h)  # silu
    return out


@triton.jit
def _fused_ffn_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    out_ptr,  # x (M, C), w1 (H, C), b1 (H,), w2 (C, H), b2 (C,), out (S, M, C)
    M,
    C,
    H,
    stride_xm,
    stride_xc,
    stride_w1h,
    stride_w1c,
    stride_w2c,
    stride_w2h,
    stride_os,
    stride_om,
    stride_oc,
    ACTIVATION: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid: (hidden slices, row tiles). This program: rows offs_m, hidden units offs_h.
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_mask, h_mask = offs_m < M, offs_h < H
    # First GEMM: hidden tile (BM, BH) = x[rows] @ w1[units].T, reduced over C in BLOCK_C steps.
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xc,
            mask=m_mask[:, None] & c_mask[None, :],
            other=0.0,
        )  # (BM, BC)
        w1 = tl.load(
            w1_ptr + offs_h[None, :] * stride_w1h + offs_c[:, None] * stride_w1c,
            mask=c_mask[:, None] & h_mask[None, :],
            other=0.0,
        )  # (BC, BH)
        acc += tl.dot(x.to(DOT_DTYPE), w1.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    if HAS_B1:
        acc += tl.load(b1_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
    # The activation, in registers; rounded to the dot dtype as eager PyTorch stores it (bf16 on the GPU).
    hidden = _activate(acc, ACTIVATION).to(DOT_DTYPE)  # (BM, BH)
    # Second GEMM: this slice's share of every output column, out[slice] (BM, C) = hidden @ w2[:, units].T.
    first_slice = tl.program_id(0) == 0  # the output bias goes into slice 0's partial only
    for n0 in range(0, C, BLOCK_C):
        offs_n = n0 + tl.arange(0, BLOCK_C)
        n_mask = offs_n < C
        w2 = tl.load(
            w2_ptr + offs_n[None, :] * stride_w2c + offs_h[:, None] * stride_w2h,
            mask=h_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # (BH, BC)
        part = tl.dot(hidden, w2.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BM, BC) fp32
        if HAS_B2:
            part += tl.load(b2_ptr + offs_n, mask=n_mask & first_slice, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + tl.program_id(0) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_oc
        tl.store(out_ptrs, part, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, S, MC, BLOCK: tl.constexpr):
    """out (M, C) = sum over s of part (S, M, C) fp32, both contiguous, cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MC
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * MC + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _activation_fn(activation: str):
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }[activation]


def _check(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"w1 and w2 must be 2-D (nn.Linear layout), got {tuple(w1.shape)} and {tuple(w2.shape)}")
    h, c = w1.shape
    if x.shape[-1] != c or w2.shape != (c, h):
        raise ValueError(
            f"shapes must be x (..., C), w1 (H, C), w2 (C, H); got x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    if b1 is not None and b1.shape != (h,):
        raise ValueError(f"b1 must have shape ({h},), got {tuple(b1.shape)}")
    if b2 is not None and b2.shape != (c,):
        raise ValueError(f"b2 must have shape ({c},), got {tuple(b2.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


def reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu",
) -> torch.Tensor:
    """act(x @ w1.T + b1) @ w2.T + b2 computed in fp32, returned in x's dtype. x (..., C) -> (..., C)."""
    _check(x, w1, b1, w2, b2, activation)
    f32 = lambda t: None if t is None else t.float()
    hidden = _activation_fn(activation)(F.linear(x.float(), w1.float(), f32(b1)))  # (..., H)
    return F.linear(hidden, w2.float(), f32(b2)).to(x.dtype)


def fused_ffn_triton(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu",
    *,
    block_h: int | None = None,
) -> torch.Tensor:
    """The fused kernel: x (M, C), w1 (H, C), w2 (C, H), biases optional -> (M, C) in x's dtype.
    `block_h` (one of BLOCK_H_CHOICES) overrides the hidden slice per program (None: picked by shape)."""
    _check(x, w1, b1, w2, b2, activation)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (M, C), got {tuple(x.shape)}")
    m, c = x.shape
    h = w1.shape[0]
    weight_bytes = (w1.numel() + w2.numel()) * w1.element_size()
    cfg = _pick_config(m, c, h, weight_bytes, num_sms(x.device), block_h)
    out = torch.empty((cfg.splits, m, c), device=x.device, dtype=torch.float32)  # (S, M, C) partial sums
    grid = (cfg.splits, triton.cdiv(m, cfg.block_m))
    _fused_ffn_kernel[grid](
        x,
        w1,
        b1 if b1 is not None else w1,
        w2,
        b2 if b2 is not None else w2,
        out,  # unused bias pointers: any tensor
        m,
        c,
        h,
        *x.stride(),
        *w1.stride(),
        *w2.stride(),
        *out.stride(),
        ACTIVATION=activation,
        HAS_B1=b1 is not None,
        HAS_B2=b2 is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_H=cfg.block_h,
        BLOCK_C=BLOCK_C,
        **dot_args(x),
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    y = torch.empty((m, c), device=x.device, dtype=x.dtype)
    # One small kernel sums the hidden slices' partials and casts (eager sum + cast would be two more launches).
    _sum_partials_kernel[(triton.cdiv(m * c, SUM_BLOCK),)](out, y, cfg.splits, m * c, BLOCK=SUM_BLOCK)
    return y  # (M, C)


def fused_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    activation: str = "gelu",
    impl: Impl = "auto",
) -> torch.Tensor:
    """act(x @ w1.T + b1) @ w2.T + b2 for x (..., C) -> (..., C) in x's dtype; see the module docstring for `impl`."""
    _check(x, w1, b1, w2, b2, activation)
    x2 = x.reshape(-1, x.shape[-1])  # (M, C)
    m = x2.shape[0]
    tensors = [t for t in (x2, w1, b1, w2, b2) if t is not None]
    if use_triton(impl, *tensors, supported=m > 0) and (impl == "triton" or m <= MAX_FUSED_M):
        y = fused_ffn_triton(x2, w1, b1, w2, b2, activation)
    else:
        y = reference(x2, w1, b1, w2, b2, activation)
    return y.reshape(x.shape)
