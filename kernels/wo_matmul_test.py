"""Tests for the weight-only INT8 / INT4 matmuls: Triton (interpreter on CPU) against dequantise-then-matmul."""

import pytest
import torch

from kernels.quant_format import INT4_GROUP_SIZES, pack_int4, pack_int8, unpack_int4
from kernels.wo_matmul import (
    int4_matmul,
    int4_matmul_reference,
    int4_matmul_triton,
    int8_matmul,
    int8_matmul_reference,
    int8_matmul_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs GPU tensors where there is a GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real shapes in bf16)")


def _inputs(m: int, n: int, k: int, seed: int, device: str = DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device)
    return x, w


@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("split_k", [None, 1, 2])
def test_int8_triton_matches_reference(m, split_k):
    x, w = _inputs(m, 40, 256, seed=m)  # N = 40: a partial N tile; K = 256: two K tiles
    q, scale = pack_int8(w)
    got = int8_matmul_triton(x, q, scale, split_k=split_k)
    torch.testing.assert_close(got, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize("m,split_k", [(1, None), (3, 2), (17, 1)])
def test_int4_triton_matches_reference(group_size, m, split_k):
    x, w = _inputs(m, 24, 256, seed=group_size + m)
    packed, scales = pack_int4(w, group_size)
    got = int4_matmul_triton(x, packed, scales, group_size, split_k=split_k)
    torch.testing.assert_close(got, int4_matmul_reference(x, packed, scales, group_size), atol=1e-4, rtol=1e-4)


def test_int4_logits_within_quantization_error_bound():
    # |x @ w.T - x @ dequant(w).T| <= |x| @ (scale / 2).T: each weight is off by at most half a step.
    group_size = 32
    x, w = _inputs(4, 32, 128, seed=7)
    packed, scales = pack_int4(w, group_size)
    err = (int4_matmul_triton(x, packed, scales, group_size) - x @ w.T).abs()  # (M, N)
    bound = x.abs() @ (scales.repeat_interleave(group_size, dim=1) / 2).T
    assert torch.all(err <= bound + 1e-5)
    ref_err = (int4_matmul_reference(x, packed, scales, group_size) - x @ w.T).abs()
    torch.testing.assert_close(err, ref_err, atol=1e-4, rtol=0)


def test_bf16_input_gives_bf16_output_close_to_reference():
    x, w = _inputs(3, 32, 256, seed=11, dtype=torch.bfloat16)
    packed, scales = pack_int4(w, 64)
    got = int4_matmul_triton(x, packed, scales, 64)
    assert got.dtype == torch.bfloat16
    ref = x.float() @ unpack_int4(packed, scales, 64).T
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)
    q, scale = pack_int8(w)
    got8 = int8_matmul_triton(x, q, scale, split_k=2)
    assert got8.dtype == torch.bfloat16
    torch.testing.assert_close(got8.float(), int8_matmul_reference(x.float(), q, scale), atol=3e-2, rtol=3e-2)


def test_wrappers_accept_leading_dims_and_fall_back_on_cpu():
    x, w = _inputs(6, 16, 64, seed=3, device="cpu")
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 32)
    x3 = x.reshape(2, 3, 64)  # (B, T, K)
    y8 = int8_matmul(x3, q, scale)
    y4 = int4_matmul(x3, packed, scales, 32)
    assert y8.shape == (2, 3, 16) and y4.shape == (2, 3, 16)
    torch.testing.assert_close(y8.reshape(6, 16), int8_matmul_reference(x, q, scale))
    torch.testing.assert_close(y4.reshape(6, 16), int4_matmul_reference(x, packed, scales, 32))


def test_wrappers_forced_to_triton():  # on CPU through the interpreter
    x, w = _inputs(4, 24, 256, seed=8)
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 64)
    x3 = x.reshape(2, 2, 256)
    got8 = int8_matmul(x3, q, scale, impl="triton").reshape(4, 24)
    got4 = int4_matmul(x3, packed, scales, 64, impl="triton").reshape(4, 24)
    torch.testing.assert_close(got8, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got4, int4_matmul_reference(x, packed, scales, 64), atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_value_errors():
    x, w = _inputs(2, 16, 64, seed=5)
    packed, scales = pack_int4(w, 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        int4_matmul(x, packed, scales, 48)
    with pytest.raises(ValueError, match=r"x must have shape \(M, K\) with K=64"):
        int4_matmul_triton(x[:, :32], packed, scales, 32)
    q, scale = pack_int8(w)
    with pytest.raises(ValueError, match="split_k must be in 1..1"):
        int8_matmul_triton(x, q, scale, split_k=2)


@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("k,n", [(768, 3072), (3072, 768), (768, 50304)])
def test_gpu_real_shapes_bf16(m, k, n):
    x, w = _inputs(m, n, k, seed=m + n, device="cuda", dtype=torch.bfloat16)
    q, scale = pack_int8(w)
    ref8 = x.float() @ (q.float() * scale[:, None]).T
    torch.testing.assert_close(int8_matmul(x, q, scale).float(), ref8, atol=3e-2, rtol=3e-2)
    for group_size in INT4_GROUP_SIZES:
        packed, scales = pack_int4(w, group_size)
        ref4 = x.float() @ unpack_int4(packed, scales, group_size).T
        torch.testing.assert_close(int4_matmul(x, packed, scales, group_size).float(), ref4, atol=3e-2, rtol=3e-2)
