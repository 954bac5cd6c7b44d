"""CUDA C++ RMSNorm: the built extension is there (under Bazel), matches the Triton RMSNorm and the reference on a
GPU, and everything falls back cleanly without one."""

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.fused_add_norm import MAX_FUSED_COLS, rms_norm
from kernels.rmsnorm_cuda import rmsnorm_cuda
from kernels.rmsnorm_cuda.rmsnorm_cuda import extension_path, load_extension, reference, rms_norm_cuda

UNDER_BAZEL = "TEST_SRCDIR" in os.environ  # Bazel sets it for every test; the genrule's .so is then in the data
HAS_GPU_EXTENSION = torch.cuda.is_available() and load_extension() is not None


@pytest.mark.skipif(not UNDER_BAZEL, reason="the genrule's output is only guaranteed under `bazel test`")
def test_bazel_built_extension_exists_and_imports():
    so = Path(rmsnorm_cuda.__file__).parent / "rmsnorm_cuda_ext.so"
    assert so.is_file() and so.stat().st_size > 0, f"{so} was not built by //kernels:rmsnorm_cuda_ext"
    ext = load_extension()  # built with this venv's Python, so it imports even without a GPU
    assert ext is not None
    assert ext.MAX_BACKWARD_COLS >= 4096 and ext.ROWS_PER_BLOCK >= 1
    with pytest.raises(ValueError, match="dtype must be"):
        ext.forward(0, 0, 0, 0, 1, 8, 1e-6, 99, 0)  # argument checks run before any CUDA call


def test_loader_agrees_with_what_is_on_disk():
    path = extension_path()
    ext = load_extension()
    if path is None:
        assert ext is None
    elif ext is not None:
        assert Path(ext.__file__).resolve() == Path(path).resolve()


def test_fallback_without_the_extension_or_gpu(device):
    if HAS_GPU_EXTENSION:
        pytest.skip("the extension runs here; the GPU comparison below covers it")
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 3, 48, generator=gen), torch.randn(48, generator=gen)
    torch.testing.assert_close(rms_norm_cuda(x, w, 1e-6), reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="impl='cuda' needs"):
        rms_norm_cuda(x, w, impl="cuda")
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_cuda(x, w[:10])


@pytest.mark.skipif(not HAS_GPU_EXTENSION, reason="needs a CUDA GPU and the built extension (rmsnorm_cuda/build.sh)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
# Each path of the .cu: rows in registers (1, 2, 4 vectors per lane in the backward; up to 16 in the forward), the
# generic loops (wider rows, a width that is no multiple of a 16-byte vector), many rows per warp in the backward.
@pytest.mark.parametrize(
    "shape", [(16384, 384), (4096, 1024), (333, 384), (5, 1000), (64, 4096), (7, 20), (2, 3, 4104), (9, 128)], ids=str
)
def test_cuda_matches_triton_and_reference(shape, dtype, assert_close):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(*shape, generator=gen, device="cuda").to(dtype).requires_grad_()
    w = torch.randn(shape[-1], generator=gen, device="cuda").to(dtype).requires_grad_()
    dy = torch.randn(*shape, generator=gen, device="cuda").to(dtype)
    results = {}
    for name, fn in {
        "cuda": lambda: rms_norm_cuda(x, w, 1e-6, impl="cuda"),
        # Triton's kernel takes rows up to MAX_FUSED_COLS; wider ones compare with what auto runs (PyTorch)
        "triton": lambda: rms_norm(x, w, 1e-6, impl="triton" if shape[-1] <= MAX_FUSED_COLS else "auto"),
        "reference": lambda: reference(x.float(), w.float(), 1e-6),
    }.items():
        out = fn()
        results[name] = (out, *torch.autograd.grad(out, (x, w), dy.to(out.dtype)))
    assert results["cuda"][0].dtype == dtype
    for got, triton_out, want, scale in zip(results["cuda"], results["triton"], results["reference"], (1, 1, 4)):
        assert_close(got, want, scale=scale)
        assert_close(got, triton_out, scale=scale)


class _NumpyExtension:
    """Stands in for the compiled module on CPU fp32 tensors: the same pointer-level contract, computed in numpy,
    with the CUDA grid's row partition for the dweight partial rows. Tests the Python glue without a GPU."""

    MAX_BACKWARD_COLS = 12288
    ROWS_PER_BLOCK = 4

    @staticmethod
    def _array(ptr: int, rows: int, cols: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_float * (rows * cols)).from_address(ptr)).reshape(rows, cols)

    def forward(self, x, w, y, rstd, rows, cols, eps, dtype, stream):
        assert dtype == 0 and stream == 0  # fp32 code, CPU "stream"
        X, W, Y = self._array(x, rows, cols), self._array(w, 1, cols), self._array(y, rows, cols)
        r = 1.0 / np.sqrt((X * X).mean(axis=1) + eps)
        self._array(rstd, rows, 1)[:, 0] = r
        Y[:] = X * r[:, None] * W

    def backward(self, dy, x, w, rstd, dx, dw_partial, dw, rows, cols, n_blocks, dtype, stream):
        X, DY, W = self._array(x, rows, cols), self._array(dy, rows, cols), self._array(w, 1, cols)
        r = self._array(rstd, rows, 1)[:, 0]
        xhat = X * r[:, None]
        mean_dot = (W * DY * xhat).mean(axis=1)
        self._array(dx, rows, cols)[:] = r[:, None] * (W * DY - xhat * mean_dot[:, None])
        partial = self._array(dw_partial, n_blocks, cols)
        block_of_row = (np.arange(rows) // self.ROWS_PER_BLOCK) % n_blocks  # grid-stride over row blocks
        for b in range(n_blocks):
            partial[b] = (DY * xhat)[block_of_row == b].sum(axis=0)
        self._array(dw, 1, cols)[0] = partial.sum(axis=0)


def test_autograd_glue_with_a_stand_in_extension(monkeypatch):
    monkeypatch.setattr(rmsnorm_cuda, "load_extension", lambda: _NumpyExtension())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 50, 24, generator=gen, requires_grad=True)  # 200 rows: more row blocks than the grid
    w = torch.randn(24, generator=gen, requires_grad=True)
    dy = torch.randn(4, 50, 24, generator=gen)
    out = rmsnorm_cuda.RMSNormCudaFunction.apply(x, w, 1e-6)
    grads = torch.autograd.grad(out, (x, w), dy)
    want = reference(x, w, 1e-6)
    want_grads = torch.autograd.grad(want, (x, w), dy)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)
