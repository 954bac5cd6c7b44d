"""Our Triton kernels as torch custom ops, so that torch.compile (and its CUDA graphs) runs them inside the graph.

Dynamo cannot trace a Triton launcher (autotuning, Python caches), so under torch.compile `model.layers` used to fall
back to plain PyTorch. A custom op is opaque to the compiler: its fake (meta) function tells Inductor the outputs'
shapes, `register_autograd` gives the backward (another custom op), and Inductor's generated code calls the op's
eager function, which launches our kernel; under `mode="reduce-overhead"` the launch is recorded into the CUDA graph
like any other (the first, un-captured warm-up call is where the autotuner runs).

Ops (namespace `tinylm`), each a thin call of the kernel file's own host functions:
- `flash_attention_fwd` / `flash_attention_bwd`: `kernels.flash_attention._forward` / `_backward`.
- `add_norm_fwd` / `add_norm_bwd`: `kernels.fused_add_norm._forward` / `_backward` (add + LayerNorm or RMSNorm).

Dropout seeds are tensors, inputs of the op drawn outside it (`draw_seed`: `torch.randint` on the device): inside a
CUDA graph a Python int would be baked into the recorded launch and every replay would drop the same attention
probabilities, whereas a randint on the device is replayed from the CUDA generator's graph-safe Philox state (as
Inductor's own dropout is), so each replay draws a fresh seed, which the kernels read from memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import flash_attention as fa
from kernels import fused_add_norm as fan

__all__ = ["add_layer_norm", "add_rms_norm", "draw_seed", "flash_attention"]


# ----------------------------------------------------------------------------------------------------------------
# Flash attention


def draw_seed(device: torch.device | str) -> Tensor:
    """A dropout seed (1,) int64 in [0, SEED_HIGH) on `device`, from torch's generator for that device (no sync)."""
    return torch.randint(fa.SEED_HIGH, (1,), dtype=torch.int64, device=device)


def _seed_arg(seed: Tensor | None, dropout_p: float) -> Tensor | int:
    """What the kernels take as their seed: the tensor (read on the device) when dropout is on, else a dummy 0."""
    if dropout_p == 0.0:
        return 0
    assert seed is not None and seed.numel() == 1 and seed.dtype == torch.int64, "dropout needs a (1,) int64 seed"
    return seed


@torch.library.custom_op("tinylm::flash_attention_fwd", mutates_args=())
def _flash_fwd(
    q: Tensor, k: Tensor, v: Tensor, seed: Tensor | None, causal: bool, scale: float, dropout_p: float
) -> tuple[Tensor, Tensor]:
    """O (B, H, T, D) contiguous and the base-2 log-sum-exp (B, H, T) fp32 the backward needs."""
    q, k, v = (fa._dim_contiguous(t) for t in (q, k, v))
    return fa._forward(q, k, v, causal, scale, dropout_p, _seed_arg(seed, dropout_p))


@_flash_fwd.register_fake
def _(q, k, v, seed, causal, scale, dropout_p):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("tinylm::flash_attention_bwd", mutates_args=())
def _flash_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, seed: Tensor | None, causal: bool,
    scale: float, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """dQ (B, H, T, D), dK, dV (B, H_kv, T, D), all contiguous (dK, dV summed over each KV head's query heads)."""
    q, k, v = (fa._dim_contiguous(t) for t in (q, k, v))
    return fa._backward(do, q, k, v, o, lse, causal, scale, dropout_p, _seed_arg(seed, dropout_p))


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, seed, causal, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup_context(ctx, inputs, output) -> None:
    q, k, v, seed, causal, scale, dropout_p = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p


def _flash_backward(ctx, do: Tensor, _dlse: Tensor | None):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, seed, ctx.causal, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None, None, None


_flash_fwd.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """Flash attention of q (B, H, T, D) over k, v (B, H_kv, T, D) -> (B, H, T, D) as one custom op (forward and
    backward in Triton; under torch.compile, inside the graph). `seed`: a (1,) int64 tensor for the dropout mask,
    drawn with `draw_seed` on q's device when None; the same seed gives the mask of
    `kernels.flash_attention.dropout_keep_mask(int(seed), ...)`."""
    fa._check(q, k, v)
    fa._check_dropout(dropout_p, q.shape[2])
    if q.shape[-1] not in fa.SUPPORTED_HEAD_DIMS or q.dtype not in fa.SUPPORTED_DTYPES:
        raise ValueError(
            f"the flash attention op takes head dims {fa.SUPPORTED_HEAD_DIMS} and dtypes {fa.SUPPORTED_DTYPES}; "
            f"got D={q.shape[-1]}, {q.dtype}"
        )
    scale = fa._checked_scale(q, scale)
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed(q.device)
    return _flash_fwd(q, k, v, seed if dropout_p > 0.0 else None, causal, scale, float(dropout_p))[0]


# ----------------------------------------------------------------------------------------------------------------
# Residual add + LayerNorm / RMSNorm


def _empty(like: Tensor) -> Tensor:
    """A 0-element stand-in for an output the op has no use for (a custom op returns tensors, never None)."""
    return like.new_empty((0,))


@torch.library.custom_op("tinylm::add_norm_fwd", mutates_args=())
def _add_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(norm(x + residual) in x's dtype, x + residual in residual's dtype, both x's shape; mean (N,) fp32, or 0
    elements for RMSNorm; 1/std (N,) fp32), N = x.numel() // C."""
    y, res_out, mean, rstd = fan._forward(fan._rows(x), fan._rows(residual), weight, bias, eps, is_rms)
    return y.view(x.shape), res_out.view(x.shape), _empty(rstd) if mean is None else mean, rstd


@_add_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    n_rows = x.numel() // x.shape[-1]
    stats = x.new_empty((n_rows,), dtype=torch.float32)
    return x.new_empty(x.shape), residual.new_empty(x.shape), _empty(stats) if is_rms else stats.clone(), stats


@torch.library.custom_op("tinylm::add_norm_bwd", mutates_args=())
def _add_norm_bwd(
    dy: Tensor, dres_out: Tensor | None, s: Tensor, weight: Tensor, bias: Tensor | None, mean: Tensor, rstd: Tensor,
    is_rms: bool, x_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(d(x + residual) in s's dtype with s's shape; the same in x_dtype, or 0 elements when x_dtype is s's dtype;
    dweight; dbias, or 0 elements without a bias). s is the saved new residual."""
    ds, dx, dw, db = fan._backward(
        dy, dres_out, fan._rows(s), weight, bias, None if is_rms else mean, rstd, s.dtype, x_dtype
    )
    dx = _empty(ds) if dx is ds else dx.view(s.shape)
    return ds.view(s.shape), dx, dw, _empty(dw) if db is None else db  # dw and db: tensors of their own


@_add_norm_bwd.register_fake
def _(dy, dres_out, s, weight, bias, mean, rstd, is_rms, x_dtype):
    dx = _empty(s) if x_dtype == s.dtype else s.new_empty(s.shape, dtype=x_dtype)
    db = _empty(weight) if bias is None else bias.new_empty(bias.shape)
    return s.new_empty(s.shape), dx, weight.new_empty(weight.shape), db


def _add_norm_setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, eps, is_rms = inputs
    _, res_out, mean, rstd = output
    ctx.save_for_backward(res_out, weight, bias, mean, rstd)
    ctx.is_rms, ctx.x_dtype = is_rms, x.dtype


def _add_norm_backward(ctx, dy: Tensor, dres_out: Tensor | None, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:  # only the new residual was used
        dy = torch.zeros(s.shape, dtype=ctx.x_dtype, device=s.device)
    ds, dx, dw, db = _add_norm_bwd(dy, dres_out, s, weight, bias, mean, rstd, ctx.is_rms, ctx.x_dtype)
    # x and the old residual share one gradient (in x's dtype for x where they differ)
    return (ds if dx.numel() == 0 else dx), ds, dw, (db if bias is not None else None), None, None


_add_norm_fwd.register_autograd(_add_norm_backward, setup_context=_add_norm_setup_context)


def _add_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, is_rms: bool
) -> tuple[Tensor, Tensor]:
    fan._check(x, residual, weight, bias)
    if x.shape[-1] > fan.MAX_FUSED_COLS or x.numel() == 0:
        raise ValueError(f"the add+norm op takes 1 to {fan.MAX_FUSED_COLS} columns and rows; got {tuple(x.shape)}")
    y, new_residual, _, _ = _add_norm_fwd(x, residual, weight, bias, float(eps), is_rms)
    return y, new_residual


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """new_residual = x + residual; returns (layer_norm(new_residual) * weight + bias, new_residual), as one custom
    op (forward and backward in Triton). x, residual (..., C); the normed rows in x's dtype, the sum in residual's."""
    return _add_norm(x, residual, weight, bias, eps, False)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """new_residual = x + residual; returns (rms_norm(new_residual) * weight, new_residual), as one custom op."""
    return _add_norm(x, residual, weight, None, eps, True)
