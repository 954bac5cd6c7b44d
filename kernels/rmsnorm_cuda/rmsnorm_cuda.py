"""Loader and autograd wrapper of the CUDA C++ RMSNorm (rmsnorm_cuda.cu, a pybind11 module over raw pointers).

The extension is built by Bazel (`//kernels:rmsnorm_cuda_ext`) or by `build.sh` beside this file, for one Python
version. `load_extension()` imports it when it is there and importable, else returns None, and `rms_norm_cuda`
then falls back to the Triton RMSNorm (kernels.fused_add_norm.rms_norm), which itself falls back to PyTorch on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Literal

import torch

from kernels.dispatch import num_sms
from kernels.fused_add_norm import reference as add_norm_reference
from kernels.fused_add_norm import rms_norm

__all__ = ["RMSNormCudaFunction", "extension_path", "load_extension", "reference", "rms_norm_cuda"]

log = logging.getLogger(__name__)

EXTENSION_MODULE = "kernels.rmsnorm_cuda.rmsnorm_cuda_ext"
# backward grid: 8-warp blocks, enough to fill the GPU (each warp then takes a few rows, its dweight sums staying in
# registers), few dweight partial rows for the column-sum kernel to add
BACKWARD_BLOCKS_PER_SM = 4
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # as enum DType in rmsnorm_cuda.cu


@functools.lru_cache(maxsize=1)
def load_extension() -> ModuleType | None:
    """The compiled extension module, or None where it is not built (or built for another Python)."""
    try:
        return importlib.import_module(EXTENSION_MODULE)
    except ImportError as err:
        log.debug("CUDA RMSNorm extension not available: %s", err)
        return None


def extension_path() -> str | None:
    """Where the importable extension is, without importing it; None where there is none."""
    spec = importlib.util.find_spec(EXTENSION_MODULE)
    return spec.origin if spec is not None else None


def _stream(device: torch.device) -> int:
    """The raw CUDA stream to launch on (0 for CPU tensors, which only a stand-in extension in tests takes)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _on(device: torch.device):
    """Make the tensors' GPU the current one for the launch (nothing to do, and no host time spent, when it is)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class RMSNormCudaFunction(torch.autograd.Function):
    """Autograd over the extension; x (N, C) contiguous and weight (C,) of x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ext = load_extension()
        assert ext is not None, "RMSNormCudaFunction needs the compiled extension"
        shape, weight_dtype = x.shape, weight.dtype
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, C)
        w = weight.to(x.dtype).contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        with _on(x.device):
            ext.forward(
                x2.data_ptr(),
                w.data_ptr(),
                y.data_ptr(),
                rstd.data_ptr(),
                rows,
                cols,
                eps,
                _DTYPE_CODES[x.dtype],
                _stream(x.device),
            )
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape, ctx.weight_dtype = shape, weight_dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        ext = load_extension()
        x2, w, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        dw = torch.empty(cols, dtype=x2.dtype, device=x2.device)
        blocks_needed = -(-rows // ext.ROWS_PER_BLOCK)
        n_blocks = max(1, min(blocks_needed, num_sms(x2.device) * BACKWARD_BLOCKS_PER_SM))
        dw_partial = torch.empty((n_blocks, cols), dtype=torch.float32, device=x2.device)
        with _on(x2.device):
            ext.backward(
                dy.data_ptr(),
                x2.data_ptr(),
                w.data_ptr(),
                rstd.data_ptr(),
                dx.data_ptr(),
                dw_partial.data_ptr(),
                dw.data_ptr(),
                rows,
                cols,
                n_blocks,
                _DTYPE_CODES[x2.dtype],
                _stream(x2.device),
            )
        return dx.view(ctx.shape), dw.to(ctx.weight_dtype), None


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in fp32, returned in x's dtype."""
    return add_norm_reference(x, None, weight, None, eps, is_rms=True)[0]


def _cuda_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    ext = load_extension()
    return (
        ext is not None
        and x.is_cuda
        and weight.device == x.device
        and x.dtype in _DTYPE_CODES
        and 0 < x.shape[-1] <= ext.MAX_BACKWARD_COLS
        and x.numel() > 0
    )


def rms_norm_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    impl: Literal["auto", "cuda", "triton", "reference"] = "auto",
) -> torch.Tensor:
    """rms_norm(x) * weight over the last dim of x (..., C) by the CUDA C++ kernels where they can run.

    "auto" falls back to kernels.fused_add_norm.rms_norm (Triton on GPU, PyTorch on CPU); "cuda" raises where the
    extension cannot run; "triton" and "reference" pick those.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if impl not in ("auto", "cuda", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'cuda', 'triton' or 'reference', got {impl!r}")
    if impl in ("auto", "cuda") and _cuda_ok(x, weight):
        return RMSNormCudaFunction.apply(x, weight, eps)
    if impl == "cuda":
        raise ValueError(
            "impl='cuda' needs the built extension (kernels/rmsnorm_cuda/build.sh), CUDA tensors of fp32/fp16/bf16 "
            "and C <= MAX_BACKWARD_COLS"
        )
    return rms_norm(x, weight, eps, impl=impl)
