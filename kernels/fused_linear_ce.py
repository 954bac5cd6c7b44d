"""Fused linear + cross-entropy that never holds the full (N, V) logits: chunked forward and backward in one pass.

The LM head of a GPT turns N hidden rows into N x V logits (8192 x 50304 in bf16 is 0.8 GB, and eager
cross-entropy keeps several tensors that size for the backward). Here the rows go through in chunks: each chunk's
logits are made, turned in place into the loss per row and d(loss)/d(logits) (by a Triton kernel on GPU, by PyTorch
elsewhere), and used at once for the chunk's d(hidden) and its share of d(weight); only one chunk of logits is ever
alive. The gradients are computed during the forward (as Liger-Kernel does) and scaled by d(loss) in the backward.

Loss is the mean over rows whose target is not `ignore_index`; a batch with no such row gives loss 0 and zero
gradients (F.cross_entropy gives NaN). Targets must be in [0, V) or equal `ignore_index`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import Impl, use_triton

__all__ = ["DEFAULT_CHUNK_SIZE", "LinearCrossEntropyFunction", "linear_cross_entropy", "reference"]

DEFAULT_CHUNK_SIZE = 1024  # rows per chunk: 1024 x 50304 bf16 logits = 103 MB alive at a time
BLOCK_V = 4096  # vocabulary columns per step of the in-place kernel
NUM_WARPS = 8
INTERPRET_BLOCK_V = 32


@triton.jit
def _ce_loss_and_grad_inplace(
    LOGITS,
    TARGETS,
    LOSS,
    SCALE,
    stride_row,
    V,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """One program per row: loss = logsumexp(z) - z[target]; z is overwritten with (softmax(z) - onehot) * scale."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = (target != ignore_index) & (target >= 0) & (target < V)
    scale = tl.where(valid, tl.load(SCALE), 0.0)
    # pass 1: online max and sum of exponentials
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    z_target = tl.load(ptr + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - z_target, 0.0))
    # pass 2: the gradient, in place
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(ptr + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=cols < V)


def _chunk_loss_triton(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Loss per row (n,) fp32; logits (n, V) become d(mean loss)/d(logits) in place."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    block = min(BLOCK_V, triton.next_power_of_2(V)) if logits.is_cuda else INTERPRET_BLOCK_V
    _ce_loss_and_grad_inplace[(n,)](
        logits, targets, loss, scale, logits.stride(0), V, ignore_index, BLOCK=block, num_warps=NUM_WARPS
    )
    return loss


def _chunk_loss_torch(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The same as `_chunk_loss_triton` in PyTorch (CPU, or a GPU without Triton)."""
    z = logits.float()  # (n, V)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).long().unsqueeze(1)  # (n, 1)
    loss = torch.where(valid, lse - z.gather(1, safe_targets).squeeze(1), 0.0)
    grad = torch.exp(z - lse.unsqueeze(1))
    grad.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1.0, dtype=grad.dtype))
    grad *= (valid * scale).unsqueeze(1)
    logits.copy_(grad)
    return loss


def _loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    use_kernel: bool,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss (fp32 scalar), d(loss)/d(hidden) (N, C) and d(loss)/d(weight) (V, C), chunk by chunk."""
    N, C = hidden.shape
    w = weight.to(hidden.dtype)  # (V, C) in the matmul dtype (a copy only when the dtypes differ)
    n_valid = (targets != ignore_index).sum()
    scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)  # a device tensor: no host sync
    scale = scale.reshape(1)
    chunk_loss = _chunk_loss_triton if use_kernel else _chunk_loss_torch
    dh = torch.empty((N, C), dtype=hidden.dtype, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, N, chunk_size):
        h = hidden[start : start + chunk_size]  # (n, C)
        logits = h @ w.t()  # (n, V); becomes d(loss)/d(logits) below
        loss += chunk_loss(logits, targets[start : start + chunk_size], scale, ignore_index).sum()
        if dh is not None:
            torch.mm(logits, w, out=dh[start : start + chunk_size])  # (n, V) @ (V, C)
        if dw is not None:
            if logits.dtype == torch.float32:
                dw.addmm_(logits.t(), h)
            else:  # fp32 accumulation across chunks of a low-precision product
                dw += logits.t() @ h  # (V, n) @ (n, C)
        del logits
    return loss * scale[0], dh, (dw.to(weight.dtype) if dw is not None else None)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss in the forward with both gradients alongside; the backward only scales them by d(loss)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int, use_kernel: bool):
        device_type = hidden.device.type
        compute = hidden
        if torch.is_autocast_enabled(device_type):  # the matmuls run in the autocast dtype, as nn.Linear's would
            compute = hidden.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            loss, dh, dw = _loss_and_grads(
                compute,
                weight,
                targets,
                chunk_size,
                ignore_index,
                use_kernel,
                need_dh=ctx.needs_input_grad[0],
                need_dw=ctx.needs_input_grad[1],
            )
        ctx.save_for_backward(dh.to(hidden.dtype) if dh is not None else None, dw)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        dh = dh * dloss.to(dh.dtype) if dh is not None else None
        dw = dw * dloss.to(dw.dtype) if dw is not None else None
        return dh, dw, None, None, None, None


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1
) -> torch.Tensor:
    """F.cross_entropy over the full (N, V) logits in fp32: the truth, and the memory hog."""
    return F.cross_entropy(hidden.float() @ weight.float().t(), targets.long(), ignore_index=ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -1,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of `hidden (N, C) @ weight (V, C)^T` against targets (N,), never holding all logits.

    "auto" runs the chunked path with the Triton loss kernel on CUDA and its PyTorch twin elsewhere; "triton" forces
    the kernel; "reference" is F.cross_entropy on the full logits.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, C) and weight (V, C); got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be ({hidden.shape[0]},) int64 or int32; got {tuple(targets.shape)} {targets.dtype}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if impl == "reference":
        return reference(hidden, weight, targets, ignore_index)
    use_kernel = use_triton(impl, hidden, weight, targets)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, chunk_size, ignore_index, use_kernel)
