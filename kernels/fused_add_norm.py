"""Fused residual add + RMSNorm / LayerNorm in Triton, forward and backward (Triton tutorial 05 style).

A pre-norm block computes `residual = x + residual; h = norm(residual)`: two passes over memory in eager PyTorch.
Here one kernel reads x and the residual once and writes the new residual and the normed rows; the backward reads
dy (and the new residual's own gradient) and the saved residual once, writes the one gradient that x and the old
residual share, and leaves per-program partial sums of dweight/dbias that a small torch sum finishes.

Dtypes: the new residual has residual's dtype (an fp32 residual stream works), the normed output has x's dtype;
all arithmetic is fp32. Rows are the last dim: x (..., C).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import Impl, num_sms, use_triton

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "reference", "rms_norm"]

MAX_FUSED_COLS = 8192  # a row lives in registers; wider rows spill on sm_90, so they take the reference
TILE_ELEMS = 4096  # rows per program = TILE_ELEMS // padded row width: small rows share a program
MAX_BLOCK_ROWS = 16
ELEMS_PER_WARP = 512  # num_warps = tile elements / ELEMS_PER_WARP, within [MIN_WARPS, MAX_WARPS]
MIN_WARPS, MAX_WARPS = 4, 16
BWD_PROGRAMS_PER_SM = 4  # persistent backward: programs loop over row blocks, one dweight partial each


def _blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_C, num_warps) for rows of n_cols elements."""
    block_c = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(MAX_BLOCK_ROWS, TILE_ELEMS // block_c))
    num_warps = min(MAX_WARPS, max(MIN_WARPS, block_rows * block_c // ELEMS_PER_WARP))
    return block_rows, block_c, num_warps


@triton.jit
def _add_norm_fwd(
    X,
    RES,
    W,
    B,
    Y,
    RES_OUT,
    MEAN,
    RSTD,
    stride_x,
    stride_res,
    stride_y,
    stride_res_out,
    n_rows,
    n_cols,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_ROWS rows. s = x + residual (stored), y = norm(s) * w (+ b); keeps mean and 1/std."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    s = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_out = (s + r).to(RES_OUT.dtype.element_ty)  # rounded as an eager add would round it
        tl.store(RES_OUT + rows64 * stride_res_out + cols[None, :], s_out, mask=mask)
        s = s_out.to(tl.float32)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, 1) / n_cols + eps)
        xhat = s * rstd[:, None]
    else:
        mean = tl.sum(s, 1) / n_cols
        centred = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / n_cols + eps)
        xhat = centred * rstd[:, None]
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = xhat * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd(
    DY,
    DRES_OUT,
    S,
    W,
    MEAN,
    RSTD,
    DS,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_dy,
    stride_dres_out,
    stride_s,
    stride_ds,
    n_rows,
    n_cols,
    IS_RMS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Persistent program: row blocks pid, pid + n_programs, ...; ds = d(norm input); dweight partial per program."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(pid * BLOCK_ROWS, n_rows, n_programs * BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        s = tl.load(S + rows64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = s * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, 1) / n_cols
        if IS_RMS:
            ds = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, 1) / n_cols
            ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:  # the new residual also flows on to the next block
            ds += tl.load(DRES_OUT + rows64 * stride_dres_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DS + rows64 * stride_ds + cols[None, :], ds.to(DS.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
        if HAS_BIAS:
            db += tl.sum(dy, 0)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=col_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C) with unit column stride (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x, residual, weight, bias, eps: float, is_rms: bool):
    """(y, new_residual or None, mean or None, rstd) over rows of x (N, C)."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    res_out = torch.empty_like(residual) if residual is not None else None
    mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_rows, block_c, num_warps = _blocks(n_cols)
    _add_norm_fwd[(triton.cdiv(n_rows, block_rows),)](
        x,
        residual,
        weight,
        bias,
        y,
        res_out,
        mean,
        rstd,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        n_rows,
        n_cols,
        eps,
        IS_RMS=is_rms,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return y, res_out, mean, rstd


def _backward(dy, dres_out, s, weight, bias, mean, rstd, grad_dtype: torch.dtype):
    """(ds, dweight, dbias or None): ds is the gradient of the norm's input (x + residual)."""
    n_rows, n_cols = s.shape
    dy = _rows(dy)
    dres_out = _rows(dres_out) if dres_out is not None else None
    ds = torch.empty((n_rows, n_cols), dtype=grad_dtype, device=s.device)
    block_rows, block_c, num_warps = _blocks(n_cols)
    n_programs = max(1, min(triton.cdiv(n_rows, block_rows), num_sms(s.device) * BWD_PROGRAMS_PER_SM))
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=s.device)
    db_partial = torch.empty_like(dw_partial) if bias is not None else None
    _add_norm_bwd[(n_programs,)](
        dy,
        dres_out,
        s,
        weight,
        mean,
        rstd,
        ds,
        dw_partial,
        db_partial,
        dy.stride(0),
        dres_out.stride(0) if dres_out is not None else 0,
        s.stride(0),
        ds.stride(0),
        n_rows,
        n_cols,
        IS_RMS=mean is None,
        HAS_DRES=dres_out is not None,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return ds, dw, db


class AddNormFunction(torch.autograd.Function):
    """Autograd for the fused kernels. With a residual it returns (normed, new_residual), else normed."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, is_rms: bool):
        shape = x.shape
        x2, res2 = _rows(x), (_rows(residual) if residual is not None else None)
        y, res_out, mean, rstd = _forward(x2, res2, weight, bias, eps, is_rms)
        ctx.save_for_backward(res_out if res_out is not None else x2, weight, bias, mean, rstd)
        ctx.shape, ctx.x_dtype = shape, x.dtype
        ctx.res_dtype = residual.dtype if residual is not None else None
        if res_out is None:
            return y.view(shape)
        return y.view(shape), res_out.view(shape)

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        # one gradient for x and the old residual, made in the residual's dtype (an fp32 stream stays fp32)
        grad_dtype = ctx.res_dtype if ctx.res_dtype is not None else ctx.x_dtype
        ds, dw, db = _backward(dy, dres_out, s, weight, bias, mean, rstd, grad_dtype)
        ds = ds.view(ctx.shape)
        dx = ds if grad_dtype == ctx.x_dtype else ds.to(ctx.x_dtype)
        dres = ds if ctx.res_dtype is not None else None
        return dx, dres, dw, db, None, None


def reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual) * weight + bias in x's dtype, x + residual in residual's dtype); fp32 arithmetic."""
    s = x if residual is None else (x.float() + residual.float()).to(residual.dtype)
    h = s.float()
    if not is_rms:
        h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * weight.float()
    if bias is not None:
        h = h + bias.float()
    return h.to(x.dtype), (s if residual is not None else None)


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    C = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != (C,):
        raise ValueError(f"weight must be ({C},), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must be ({C},), got {tuple(bias.shape)}")


def _norm(x, residual, weight, bias, eps: float, is_rms: bool, impl: Impl):
    _check(x, residual, weight, bias)
    tensors = [t for t in (x, residual, weight, bias) if t is not None]
    if use_triton(impl, *tensors, supported=x.shape[-1] <= MAX_FUSED_COLS and x.numel() > 0):
        return AddNormFunction.apply(x, residual, weight, bias, eps, is_rms)
    normed, new_residual = reference(x, residual, weight, bias, eps, is_rms)
    return normed if residual is None else (normed, new_residual)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, impl: Impl = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual; returns (rms_norm(new_residual) * weight, new_residual). x, residual (..., C)."""
    return _norm(x, residual, weight, None, eps, True, impl)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual; returns (layer_norm(new_residual) * weight + bias, new_residual)."""
    return _norm(x, residual, weight, bias, eps, False, impl)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, impl: Impl = "auto") -> torch.Tensor:
    """rms_norm(x) * weight over the last dim of x (..., C)."""
    return _norm(x, None, weight, None, eps, True, impl)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5, *, impl: Impl = "auto"
) -> torch.Tensor:
    """layer_norm(x) * weight + bias over the last dim of x (..., C)."""
    return _norm(x, None, weight, bias, eps, False, impl)
