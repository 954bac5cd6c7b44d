"""Small-batch decode GEMVs with their neighbours fused in: y = act(norm(x) @ W.T + b), x_out = x + h @ W.T + b.

A decode step at batch 1..16 is latency-bound, not bandwidth-bound: shakespeare-char's weights are 21 MB (5 us at copy
bandwidth) while its captured step spent 0.2 ms in 61 kernels of ~3.4 us each, a cuBLAS bias GEMV, a residual add +
norm, or an elementwise op apiece. So the win is fewer launches, each doing more: one kernel per linear layer, with
  - a norm prologue (LayerNorm or RMSNorm): every program recomputes its rows' statistics (d_model is small, the
    rows sit in L1/L2), so no norm kernel runs before the GEMV and the normed rows never reach memory;
  - an activation epilogue (exact or tanh GELU, ReLU^2, or SwiGLU, whose gate and up weights are read side by side);
  - a residual epilogue: x_out = x + h @ W.T + b (attention out-projection, MLP down-projection);
  - an embedding prologue (the first layer): x = tok_emb[token] + pos_emb[position], written out by program 0
    as the residual stream while every program norms and projects it.
Each program owns BLOCK_N output features of all M (<= MAX_ROWS) rows and streams their weight rows, K contiguous (wide
loads), accumulating in fp32 (FMA: acc (BM, BN) += sum_k x (BM, 1, BK) * w (1, BN, BK); a 16-row `tl.dot` would
multiply padding at M = 1). Intermediate roundings follow the eager model (the normed rows, the projection and the
residual sum are rounded to the weights' dtype where eager PyTorch stores them), so bf16 results track the unfused path.
No host sync, no allocation but the outputs, shapes fixed by the inputs: capturable in a CUDA graph (after a first,
autotuning call outside the capture: BLOCK_N, BLOCK_K and warps are tuned per (M bucket, N, K, fusion flags)).

    norm_linear            act(norm(x) @ W.T + b) (x (M, K) -> (M, N)), or with `embedding`, (that, x)
    linear_residual        residual + h @ W.T + b (h (M, K), residual (M, N) -> (M, N))
    *_reference            the same in fp32 PyTorch (the truth), output in the requested dtype
impl="auto" runs Triton for CUDA inputs with M <= MAX_ROWS and the reference otherwise; "triton" / "reference" force
one (kernels/dispatch.py; "triton" on CPU tensors needs TRITON_INTERPRET=1). Inference only (no autograd).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import Impl, use_triton
from kernels.fused_ffn import _activate  # exact / tanh GELU, as fused_ffn computes them

__all__ = [
    "ACTIVATIONS",
    "MAX_ROWS",
    "NORMS",
    "Embedding",
    "NormParams",
    "linear_residual",
    "linear_residual_reference",
    "norm_linear",
    "norm_linear_reference",
]

NORMS: tuple[str, ...] = ("layernorm", "rmsnorm")
ACTIVATIONS: tuple[str, ...] = ("none", "gelu", "gelu_tanh", "relu2", "swiglu")
MAX_ROWS = 16  # rows (tokens in flight) the kernel is meant for; above, a cuBLAS GEMM re-reads nothing and wins
# (BLOCK_N, BLOCK_K, num_warps) tried by the autotuner, kept where the FMA product tile (BLOCK_M x BLOCK_N x BLOCK_K)
# holds at most MAX_PRODUCT_PER_THREAD fp32 values per thread. Small BLOCK_N: at N = 384 and BLOCK_N 2..8 the grid
# reaches 48..192 programs, the parallelism a latency-bound GEMV needs (an H200 has 132 SMs). Few configs: each is a
# compile per (row bucket, fusion flags), paid at the first decode step of a server. The budgets come from building
# every config for sm_90 (Triton + ptxas, no GPU): at 64 values per thread none spills at BLOCK_M 1..16.
_CANDIDATES = ((2, 256, 2), (4, 256, 4), (4, 512, 4), (8, 128, 4), (16, 64, 4), (4, 128, 8))
MAX_PRODUCT_PER_THREAD = 64
# Normed (or embedded) rows whose padded tile (BLOCK_M x next_pow2(K)) is at most MAX_ONE_CHUNK_ELEMS are read once,
# whole (BLOCK_K = next_pow2(K), not tuned): the statistics come from registers and the GEMV reuses the tile, so a
# program waits for one round trip to its rows, not three. The tile stays in registers through the kernel, so the
# warps are chosen to hold at most MAX_WHOLE_PER_THREAD of its values per thread; the autotuner tries (BLOCK_N,
# num_warps). shakespeare-char (K 384 -> 512): whole rows up to 8 rows.
MAX_ONE_CHUNK_ELEMS = 4096
MAX_WHOLE_PER_THREAD = 32
_ONE_CHUNK_CANDIDATES = ((2, 2), (2, 4), (4, 4), (8, 4), (4, 8))
INTERPRET_BLOCK_N, INTERPRET_BLOCK_K = 16, 32  # the CPU interpreter's fixed tile (no tuning): K and N tails exercised
AUTOTUNE_REP_MS = 10  # per config; do_bench_cudagraph replays a graph of the call, as decode runs it
# False: the first config of the list, untuned (the GPU tests of many small shapes set it, so that each shape does not
# compile and time the whole set)
AUTOTUNE = True


@dataclass(frozen=True)
class NormParams:
    """The norm a GEMV's prologue applies to its input rows: `kind` in NORMS, weight (K,), bias (K,) or None."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __post_init__(self) -> None:
        if self.kind not in NORMS:
            raise ValueError(f"norm kind must be one of {NORMS}, got {self.kind!r}")
        if self.kind == "rmsnorm" and self.bias is not None:
            raise ValueError("an rmsnorm has no bias: pass bias=None")


@dataclass(frozen=True)
class Embedding:
    """The first layer's input, computed in the prologue: x[m] = tok_weight[tokens[m]] + pos_weight[positions[m]]
    (positions clamped to the table, as the model does for padding rows; pos_weight None: no learned positions)."""

    tokens: torch.Tensor  # (M,) int
    positions: torch.Tensor  # (M,) int
    tok_weight: torch.Tensor  # (V, K)
    pos_weight: torch.Tensor | None  # (P, K)


@triton.jit
def _load_rows(row_ptrs, pos_row_ptrs, m_mask, offs_k, k_mask, EMBED: tl.constexpr, HAS_POS: tl.constexpr):
    """(BM, BK) fp32 tile of the input rows, given each row's base pointer: x's row, or (EMBED) the token's embedding
    row plus (HAS_POS) the position's, summed and rounded to the table's dtype as eager adds them."""
    mask = m_mask[:, None] & k_mask[None, :]
    x = tl.load(row_ptrs[:, None] + offs_k[None, :], mask=mask, other=0.0)
    if EMBED:
        if HAS_POS:
            p = tl.load(pos_row_ptrs[:, None] + offs_k[None, :], mask=mask, other=0.0)
            # Summed in fp32 and rounded, as eager adds (the CPU interpreter would add bf16 bit patterns)
            x = (x.to(tl.float32) + p.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _stats(x, mask, K, eps, NORM: tl.constexpr):
    """Mean (0 for RMSNorm) and 1/std of rows x (BM, BK) fp32 held whole, exact two-pass."""
    mean = tl.zeros((x.shape[0],), dtype=tl.float32)
    if NORM == "layernorm":
        mean = tl.sum(x, axis=1) / K
    d = tl.where(mask, x - mean[:, None], 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)


@triton.jit
def _decode_gemv_kernel(
    x_ptr,
    tok_ptr,
    pos_ptr,
    temb_ptr,
    pemb_ptr,
    xout_ptr,  # EMBED: the embedding rows (M, K) written here by program 0
    nw_ptr,
    nb_ptr,
    w_ptr,
    b_ptr,
    wg_ptr,
    bg_ptr,  # SwiGLU: the gate's weight (N, K) and bias; w/b are the up projection's
    res_ptr,
    out_ptr,
    M,
    N,
    K,
    n_pos,
    eps,
    stride_xm,
    stride_te,
    stride_pe,
    stride_xom,
    stride_wn,
    stride_wgn,
    stride_rm,
    stride_om,
    NORM: tl.constexpr,  # "none", "layernorm" or "rmsnorm"
    HAS_NORM_B: tl.constexpr,
    EMBED: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # K <= BLOCK_K: the rows are loaded once
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: output features offs_n of every row. Input rows are contiguous along K (stride 1)."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    m_mask = rows < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    wdtype = w_ptr.dtype.element_ty  # the model's dtype: eager rounds to it between ops
    # Each row's base pointer: its x row, or its token's (and position's) embedding row.
    if EMBED:
        tok = tl.load(tok_ptr + rows, mask=m_mask, other=0).to(tl.int64)
        row_ptrs = temb_ptr + tok * stride_te
        pos = tl.minimum(tl.load(pos_ptr + rows, mask=m_mask, other=0), n_pos - 1).to(tl.int64)
        pos_row_ptrs = pemb_ptr + pos * stride_pe
    else:
        row_ptrs = x_ptr + rows.to(tl.int64) * stride_xm
        pos_row_ptrs = row_ptrs

    # Prologue: the rows' statistics, exact two-pass (mean, then the mean square of x - mean), in fp32.
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    whole = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if ONE_CHUNK:
        offs_k = tl.arange(0, BLOCK_K)
        whole = _load_rows(row_ptrs, pos_row_ptrs, m_mask, offs_k, offs_k < K, EMBED, HAS_POS)  # (BM, BK)
        if NORM != "none":
            mean, rstd = _stats(whole, m_mask[:, None] & (offs_k < K)[None, :], K, eps, NORM)
    elif NORM != "none":
        if NORM == "layernorm":
            total = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                total += tl.sum(_load_rows(row_ptrs, pos_row_ptrs, m_mask, offs_k, offs_k < K, EMBED, HAS_POS), 1)
            mean = total / K
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = _load_rows(row_ptrs, pos_row_ptrs, m_mask, offs_k, k_mask, EMBED, HAS_POS)
            d = tl.where(m_mask[:, None] & k_mask[None, :], x - mean[:, None], 0.0)
            sq += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(sq / K + eps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if ONE_CHUNK:
            x = whole
        else:
            x = _load_rows(row_ptrs, pos_row_ptrs, m_mask, offs_k, k_mask, EMBED, HAS_POS)  # (BM, BK)
        if EMBED:  # the residual stream's first value
            xo_ptrs = xout_ptr + rows[:, None] * stride_xom + offs_k[None, :]
            tl.store(xo_ptrs, x.to(xout_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :] & (pid == 0))
        if NORM != "none":
            x = (x - mean[:, None]) * rstd[:, None]
            x = x * tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_NORM_B:
                x += tl.load(nb_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            x = x.to(wdtype).to(tl.float32)  # eager's norm kernel stores its output in the model's dtype
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)  # (BN, BK)
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if ACTIVATION == "swiglu":
            wg = tl.load(wg_ptr + offs_n[:, None] * stride_wgn + offs_k[None, :], mask=w_mask, other=0.0)
            acc_g += tl.sum(x[:, None, :] * wg.to(tl.float32)[None, :, :], axis=2)

    # Epilogue: bias, then the activation or the residual add, each on the value eager would hold in wdtype.
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = acc.to(wdtype).to(tl.float32)
    if ACTIVATION == "swiglu":
        if HAS_GATE_BIAS:
            acc_g += tl.load(bg_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        gate = acc_g.to(wdtype).to(tl.float32)
        out = gate * tl.sigmoid(gate) * out  # silu(gate) * up
    elif ACTIVATION == "relu2":
        out = tl.maximum(out, 0.0)
        out = out * out
    elif ACTIVATION != "none":
        out = _activate(out, ACTIVATION)
    o_mask = m_mask[:, None] & n_mask[None, :]
    if RESIDUAL:
        out += tl.load(res_ptr + rows[:, None] * stride_rm + offs_n[None, :], mask=o_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)


def _configs(block_m: int, block_k: int | None) -> list[triton.Config]:
    """The autotuner's configs for a row bucket: (BLOCK_N, BLOCK_K, warps), or (BLOCK_N, warps) at a fixed BLOCK_K
    (one chunk); those within the register budget, else the smallest product per thread."""
    if block_k is None:
        cands = [({"BLOCK_N": bn, "BLOCK_K": bk}, w, bn * bk) for bn, bk, w in _CANDIDATES]
    else:
        cands = [
            ({"BLOCK_N": bn}, w, bn * block_k)
            for bn, w in _ONE_CHUNK_CANDIDATES
            if block_m * block_k <= MAX_WHOLE_PER_THREAD * 32 * w
        ]
    kept = [c for c in cands if block_m * c[2] <= MAX_PRODUCT_PER_THREAD * 32 * c[1]]
    kept = kept or [min(cands, key=lambda c: c[2] / c[1])]
    return [triton.Config(kw, num_warps=w, num_stages=2) for kw, w, _ in kept]


@functools.lru_cache(maxsize=None)
def _tuned(block_m: int, block_k: int | None):
    """The autotuned kernel for one row bucket (and fixed BLOCK_K, or None): its own configs, since the product tile
    grows with BLOCK_M."""
    return triton.autotune(
        configs=_configs(block_m, block_k),
        key=["N", "K", "NORM", "EMBED", "ACTIVATION", "RESIDUAL"],
        do_bench=lambda fn, quantiles: triton.testing.do_bench_cudagraph(fn, rep=AUTOTUNE_REP_MS, quantiles=quantiles),
    )(_decode_gemv_kernel)


def _check_linear(x_rows: int, k: int, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> int:
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{name} must have shape (N, K={k}) (nn.Linear layout), got {tuple(weight.shape)}")
    if weight.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along K (stride 1), got strides {weight.stride()}")
    n = weight.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}'s bias must have shape ({n},), got {tuple(bias.shape)}")
    if x_rows < 1:
        raise ValueError(f"the input must have at least one row, got {x_rows}")
    return n


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"{name} must be 2-D (M, K) and contiguous along K, got shape {tuple(x.shape)}, strides {x.stride()}"
        )


def _embed_reference(e: Embedding) -> torch.Tensor:
    """The embedding rows (M, K) in the table's dtype, as eager computes them (tok + pos, rounded)."""
    x = e.tok_weight[e.tokens.long()]
    if e.pos_weight is not None:
        x = x + e.pos_weight[e.positions.long().clamp(max=e.pos_weight.shape[0] - 1)]
    return x


def _norm_reference(x: torch.Tensor, norm: NormParams) -> torch.Tensor:
    xf = x.float()
    if norm.kind == "rmsnorm":
        return F.rms_norm(xf, (xf.shape[-1],), norm.weight.float(), norm.eps)
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(xf, (xf.shape[-1],), norm.weight.float(), bias, norm.eps)


def _act_reference(y: torch.Tensor, gate: torch.Tensor | None, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(gate) * y
    if activation == "relu2":
        return F.relu(y).square()
    if activation == "none":
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def norm_linear_reference(
    x: torch.Tensor | None,
    norm: NormParams,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    activation: str = "none",
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    embedding: Embedding | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """act(norm(x) @ weight.T + bias) in fp32 (swiglu: silu(norm(x) @ gate_weight.T + gate_bias) * (...)), returned in
    out_dtype (default weight's). With `embedding` (x None): (that, the embedding rows (M, K))."""
    rows = _embed_reference(embedding) if embedding is not None else x
    h = _norm_reference(rows, norm)
    f32 = lambda t: None if t is None else t.float()
    y = F.linear(h, weight.float(), f32(bias))
    gate = F.linear(h, gate_weight.float(), f32(gate_bias)) if activation == "swiglu" else None
    out = _act_reference(y, gate, activation).to(out_dtype or weight.dtype)
    return (out, rows) if embedding is not None else out


def linear_residual_reference(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """residual + h @ weight.T + bias in fp32, returned in residual's dtype."""
    y = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
    return (residual.float() + y).to(residual.dtype)


def _launch(
    m: int,
    n: int,
    k: int,
    *,
    out: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor | None = None,
    norm: NormParams | None = None,
    embedding: Embedding | None = None,
    x_out: torch.Tensor | None = None,
    activation: str = "none",
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> None:
    """One launch of the kernel; unused pointers get `weight` (never read: their flags are off)."""
    e = embedding
    any_ptr = weight
    gate = gate_weight if gate_weight is not None else weight
    args = (
        x if x is not None else any_ptr,
        e.tokens if e else any_ptr,
        e.positions if e else any_ptr,
        e.tok_weight if e else any_ptr,
        e.pos_weight if e is not None and e.pos_weight is not None else any_ptr,
        x_out if x_out is not None else any_ptr,
        norm.weight if norm else any_ptr,
        norm.bias if norm is not None and norm.bias is not None else any_ptr,
        weight,
        bias if bias is not None else any_ptr,
        gate,
        gate_bias if gate_bias is not None else any_ptr,
        residual if residual is not None else any_ptr,
        out,
        m,
        n,
        k,
        e.pos_weight.shape[0] if e is not None and e.pos_weight is not None else 1,
        norm.eps if norm else 0.0,
        x.stride(0) if x is not None else 0,
        e.tok_weight.stride(0) if e else 0,
        e.pos_weight.stride(0) if e is not None and e.pos_weight is not None else 0,
        x_out.stride(0) if x_out is not None else 0,
        weight.stride(0),
        gate.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
    )
    block_m = triton.next_power_of_2(m)
    one_chunk = (norm is not None or e is not None) and block_m * triton.next_power_of_2(k) <= MAX_ONE_CHUNK_ELEMS
    meta = dict(
        NORM=norm.kind if norm else "none",
        HAS_NORM_B=norm is not None and norm.bias is not None,
        EMBED=e is not None,
        HAS_POS=e is not None and e.pos_weight is not None,
        HAS_BIAS=bias is not None,
        HAS_GATE_BIAS=gate_bias is not None,
        ACTIVATION=activation,
        RESIDUAL=residual is not None,
        ONE_CHUNK=one_chunk,
        BLOCK_M=block_m,
    )
    if one_chunk:
        meta["BLOCK_K"] = triton.next_power_of_2(k)
    if out.is_cuda and AUTOTUNE:
        tuned = _tuned(block_m, meta.get("BLOCK_K"))
        tuned[lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta)
    elif out.is_cuda:
        cfg = _configs(block_m, meta.get("BLOCK_K"))[0]
        grid = (triton.cdiv(n, cfg.kwargs["BLOCK_N"]),)
        _decode_gemv_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        meta.setdefault("BLOCK_K", INTERPRET_BLOCK_K)
        grid = (triton.cdiv(n, INTERPRET_BLOCK_N),)
        _decode_gemv_kernel[grid](*args, **meta, BLOCK_N=INTERPRET_BLOCK_N, num_warps=4)


def norm_linear(
    x: torch.Tensor | None,
    norm: NormParams,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    activation: str = "none",
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    embedding: Embedding | None = None,
    out_dtype: torch.dtype | None = None,
    impl: Impl = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """act(norm(x) @ weight.T + bias) for x (M, K) -> (M, N) in out_dtype (default weight's), in one launch.

    activation in ACTIVATIONS; "swiglu" takes gate_weight (N, K) (and gate_bias): silu(gate) * up, weight being up's.
    embedding (x None): the rows are the first layer's embeddings; returns (output, embedding rows (M, K) in the
    table's dtype), the residual stream's first value.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (x is None) == (embedding is None):
        raise ValueError("pass exactly one of x and embedding")
    if (gate_weight is not None) != (activation == "swiglu"):
        raise ValueError("gate_weight is given exactly when activation='swiglu'")
    if x is not None:
        _check_rows(x, "x")
        m, k = x.shape
    else:
        m, k = embedding.tokens.shape[0], embedding.tok_weight.shape[1]
        _check_rows(embedding.tok_weight, "embedding.tok_weight")
        if embedding.pos_weight is not None:
            _check_rows(embedding.pos_weight, "embedding.pos_weight")
        if embedding.positions.shape != (m,) or embedding.tokens.dim() != 1:
            raise ValueError(
                f"embedding tokens and positions must both have shape (M,), got {tuple(embedding.tokens.shape)} and "
                f"{tuple(embedding.positions.shape)}"
            )
    n = _check_linear(m, k, weight, bias, "weight")
    if gate_weight is not None and _check_linear(m, k, gate_weight, gate_bias, "gate_weight") != n:
        raise ValueError(f"gate_weight must have weight's shape {tuple(weight.shape)}, got {tuple(gate_weight.shape)}")
    if norm.weight.shape != (k,):
        raise ValueError(f"the norm's weight must have shape ({k},), got {tuple(norm.weight.shape)}")
    tensors = [t for t in (x, weight, embedding and embedding.tok_weight) if t is not None]
    if not (use_triton(impl, *tensors) and (impl == "triton" or m <= MAX_ROWS)):
        return norm_linear_reference(
            x,
            norm,
            weight,
            bias,
            activation=activation,
            gate_weight=gate_weight,
            gate_bias=gate_bias,
            embedding=embedding,
            out_dtype=out_dtype,
        )
    out = torch.empty((m, n), device=weight.device, dtype=out_dtype or weight.dtype)
    x_out = None
    if embedding is not None:
        x_out = torch.empty((m, k), device=weight.device, dtype=embedding.tok_weight.dtype)
    _launch(
        m,
        n,
        k,
        out=out,
        weight=weight,
        bias=bias,
        x=x,
        norm=norm,
        embedding=embedding,
        x_out=x_out,
        activation=activation,
        gate_weight=gate_weight,
        gate_bias=gate_bias,
    )
    return (out, x_out) if embedding is not None else out


def linear_residual(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """residual + h @ weight.T + bias for h (M, K), residual (M, N) -> a new (M, N) in residual's dtype, one launch."""
    _check_rows(h, "h")
    m, k = h.shape
    n = _check_linear(m, k, weight, bias, "weight")
    if residual.shape != (m, n) or residual.stride(1) != 1:
        raise ValueError(f"residual must have shape ({m}, {n}), contiguous along N, got {tuple(residual.shape)}")
    if not (use_triton(impl, h, weight, residual) and (impl == "triton" or m <= MAX_ROWS)):
        return linear_residual_reference(h, weight, bias, residual)
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    _launch(m, n, k, out=out, weight=weight, bias=bias, x=h, residual=residual)
    return out
