"""Fused SwiGLU in Triton: silu(gate) * up, forward and backward, one pass over memory each way.

Eager PyTorch runs silu, then the product (and in the backward four more elementwise kernels), each a full round
trip to memory; here the forward reads gate and up once and writes the product, and the backward reads dout, gate
and up once and writes both gradients. Saves gate and up (not the output) for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import Impl, use_triton

__all__ = ["SwiGLUFunction", "reference", "swiglu"]

BLOCK_SIZE = 2048  # elements per program; 16 per thread at NUM_WARPS = 4
NUM_WARPS = 4
INTERPRET_BLOCK_SIZE = 64


@triton.jit
def _swiglu_fwd(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DOUT, GATE, UP, DGATE, DUP, n, BLOCK: tl.constexpr):
    """d/dg silu(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DUP + offs, (dout * silu).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)


def _block(t: torch.Tensor) -> int:
    return BLOCK_SIZE if t.is_cuda else INTERPRET_BLOCK_SIZE


class SwiGLUFunction(torch.autograd.Function):
    """Autograd for the Triton kernels (flat, contiguous views of the inputs)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n, block = gate.numel(), _block(gate)
        _swiglu_fwd[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=NUM_WARPS)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n, block = gate.numel(), _block(gate)
        _swiglu_bwd[(triton.cdiv(n, block),)](dout, gate, up, dgate, dup, n, BLOCK=block, num_warps=NUM_WARPS)
        return dgate, dup


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, returned in gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape and dtype (e.g. (B, T, hidden))."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            "gate and up must share shape and dtype; "
            f"got {tuple(gate.shape)} {gate.dtype}, {tuple(up.shape)} {up.dtype}"
        )
    if use_triton(impl, gate, up, supported=gate.numel() > 0):
        return SwiGLUFunction.apply(gate, up)
    return reference(gate, up)
