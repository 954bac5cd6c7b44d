"""Fused FFN (Triton; the interpreter on CPU) against the fp32 PyTorch reference, on fresh random inputs."""

import pytest
import torch

from kernels.fused_ffn import (
    ACTIVATIONS,
    BLOCK_H_CHOICES,
    PARTIAL_BYTES_BUDGET,
    _pick_config,
    fused_ffn,
    fused_ffn_triton,
    reference,
)
from kernels.fused_ffn_bench import bench_cases

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"  # Triton needs GPU tensors where there is a GPU
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (real widths in bf16; the CPU runs the interpreter)")


def _inputs(m: int, c: int, h: int, seed: int, *, bias: bool = True, device: str = DEVICE, dtype=torch.float32):
    """x (M, C), w1 (H, C), b1 (H,), w2 (C, H), b2 (C,): weights scaled so activations are O(1) (both GELU tails)."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(m, c, generator=g)
    w1 = torch.randn(h, c, generator=g) / c**0.5
    b1 = torch.randn(h, generator=g) if bias else None
    w2 = torch.randn(c, h, generator=g) / h**0.5
    b2 = torch.randn(c, generator=g) if bias else None
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, w1, b1, w2, b2))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("m,block_h", [(1, None), (5, 16), (17, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_matches_reference_fp32(activation, m, block_h, bias, assert_close):
    # C = 48 and H = 80: partial C and H tiles; block_h 16 / 32 split H over 5 / 3 programs (partial sums).
    args = _inputs(m, 48, 80, seed=m + 7 * ACTIVATIONS.index(activation), bias=bias)
    got = fused_ffn_triton(*args, activation, block_h=block_h)
    assert got.shape == (m, 48) and got.dtype == torch.float32
    assert_close(got, reference(*args, activation))


def test_fp16_inputs_keep_their_dtype(assert_close):
    args = _inputs(3, 32, 64, seed=3, dtype=torch.float16)
    got = fused_ffn_triton(*args, "gelu", block_h=16)
    assert got.dtype == torch.float16
    assert_close(got, reference(*args, "gelu"))


def test_gelu_variants_differ_and_match_their_torch_definitions():
    # The exact and tanh GELUs differ by up to ~1e-3 near |x| ~ 2: the kernel must compute the one it is asked for.
    args = _inputs(4, 32, 64, seed=11)
    exact = fused_ffn_triton(*args, "gelu")
    approx = fused_ffn_triton(*args, "gelu_tanh")
    assert (exact - approx).abs().max() > 1e-4
    x, w1, b1, w2, b2 = args
    h = x @ w1.T + b1
    want_tanh = torch.nn.functional.gelu(h, approximate="tanh") @ w2.T + b2
    torch.testing.assert_close(approx, want_tanh, atol=1e-4, rtol=1e-4)  # fp32 dots are exact (no TF32)


def test_strided_inputs(assert_close):
    x, w1, b1, w2, b2 = _inputs(6, 32, 48, seed=5)
    x_wide = torch.cat([x, torch.randn(6, 8, device=x.device)], dim=1)[:, :32]  # row stride 40
    w2_t = w2.T.contiguous().T  # (C, H) with column-major strides
    assert not x_wide.is_contiguous() and not w2_t.is_contiguous()
    assert_close(fused_ffn_triton(x_wide, w1, b1, w2_t, b2, "silu"), reference(x, w1, b1, w2, b2, "silu"))


def test_wrapper_leading_dims_and_cpu_fallback(assert_close):
    x, w1, b1, w2, b2 = _inputs(6, 32, 64, seed=2, device="cpu")
    x3 = x.reshape(2, 3, 32)  # (B, T, C)
    auto = fused_ffn(x3, w1, b1, w2, b2, activation="relu")  # CPU tensors: the reference
    torch.testing.assert_close(auto, reference(x3, w1, b1, w2, b2, "relu"), atol=0, rtol=0)
    forced = fused_ffn(*(t.to(DEVICE) for t in (x3, w1, b1, w2, b2)), activation="relu", impl="triton")
    assert forced.shape == (2, 3, 32)
    assert_close(forced, auto.to(DEVICE))


def test_bad_inputs_name_what_is_wrong():
    x, w1, b1, w2, b2 = _inputs(2, 16, 32, seed=1)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_ffn(x, w1, b1, w2, b2, activation="tanh")
    with pytest.raises(ValueError, match="shapes must be"):
        fused_ffn(x, w1, b1, w2.T, b2)
    with pytest.raises(ValueError, match="b1 must have shape"):
        fused_ffn(x, w1, b2, w2, b2)
    with pytest.raises(ValueError, match="w1 must have x's dtype"):
        fused_ffn(x, w1.double(), b1, w2, b2)
    with pytest.raises(ValueError, match="block_h must be one of"):
        fused_ffn_triton(x, w1, b1, w2, b2, block_h=48)


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_config_keeps_partial_sums_within_budget(m):
    # The gpt2-124m MLP on a 132-SM GPU: partial-sum traffic stays within budget whenever some BLOCK_H allows it,
    # else the largest BLOCK_H (the fewest partials) is taken.
    c, h = 768, 3072
    weight_bytes = 2 * c * h * 2
    budget = PARTIAL_BYTES_BUDGET * weight_bytes
    cfg = _pick_config(m, c, h, weight_bytes, 132, None)
    assert cfg.block_h in BLOCK_H_CHOICES and cfg.splits == -(-h // cfg.block_h)
    if 2 * (h // BLOCK_H_CHOICES[-1]) * m * c * 4 <= budget:
        assert 2 * cfg.splits * m * c * 4 <= budget
    else:
        assert cfg.block_h == BLOCK_H_CHOICES[-1]


def test_bench_cases_pair_ours_with_eager_and_compile():
    cases = bench_cases()
    groups: dict[str, set[tuple[str, bool]]] = {}
    for case in cases:
        assert case.kernel == "fused_ffn" and case.bytes_moved > 0
        groups.setdefault(case.shape, set()).add((case.impl, case.ours))
    assert len(groups) == 6
    for impls in groups.values():
        assert impls == {("triton", True), ("eager", False), ("torch.compile", False)}


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_bf16_real_widths(activation, m, assert_close):
    args = _inputs(m, 768, 3072, seed=m, device="cuda", dtype=torch.bfloat16)
    got = fused_ffn(*args, activation=activation)  # auto: the Triton kernel on CUDA at M <= 64
    assert got.dtype == torch.bfloat16
    assert_close(got, reference(*args, activation))


@needs_gpu
def test_gpu_auto_falls_back_above_max_rows(assert_close):
    args = _inputs(100, 384, 1536, seed=4, device="cuda", dtype=torch.bfloat16)
    assert_close(fused_ffn(*args), reference(*args))
    assert_close(fused_ffn(*args, impl="triton"), reference(*args))


@needs_gpu
def test_gpu_cuda_graph_replay_follows_new_inputs():
    # Captured once, replayed on new x written in place: both launches (slices, then the partial sum) are graph-safe.
    x, w1, b1, w2, b2 = _inputs(4, 384, 1536, seed=3, dtype=torch.bfloat16)
    fused_ffn_triton(x, w1, b1, w2, b2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_ffn_triton(x, w1, b1, w2, b2)
    for seed in (1, 2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        ref = reference(x, w1, b1, w2, b2).float()
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
