"""Small-batch decode GEMVs (Triton; the interpreter on CPU) against their fp32 PyTorch references, on fresh random
inputs: every norm x activation, the residual epilogue, the embedding prologue, row counts 1..MAX_ROWS with K and N
tails, bf16; the GPU tests (real widths, CUDA-graph capture) skip without a GPU."""

import pytest
import torch

from kernels import decode_gemv
from kernels.decode_gemv import (
    ACTIVATIONS,
    MAX_PRODUCT_PER_THREAD,
    MAX_ROWS,
    NORMS,
    Embedding,
    NormParams,
    _configs,
    linear_residual,
    linear_residual_reference,
    norm_linear,
    norm_linear_reference,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (real widths in bf16, graph capture)")


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """One config per shape on the GPU (no tuning of each of the many small shapes); the graph tests tune."""
    monkeypatch.setattr(decode_gemv, "AUTOTUNE", False)


FP32 = dict(atol=1e-4, rtol=1e-4)  # the fused ops round differently from eager (erf, tanh via sigmoid) at ~1e-5


def _norm(kind: str, k: int, g: torch.Generator, dtype=torch.float32, device=DEVICE) -> NormParams:
    weight = (1 + 0.3 * torch.randn(k, generator=g)).to(device=device, dtype=dtype)
    bias = (0.2 * torch.randn(k, generator=g)).to(device=device, dtype=dtype) if kind == "layernorm" else None
    return NormParams(kind, weight, bias, 1e-5)


def _linear(n: int, k: int, g: torch.Generator, bias: bool = True, dtype=torch.float32, device=DEVICE):
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(device=device, dtype=dtype) if bias else None
    return w, b


def _rows(m: int, k: int, g: torch.Generator, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """Rows with a mean far from 0 and a spread of scales: a one-pass variance or a wrong mean would show."""
    return (3.0 + torch.randn(m, 1, generator=g) * torch.randn(m, k, generator=g)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("norm_kind", NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("m,k,n,bias", [(1, 40, 50, True), (5, 72, 33, False), (16, 24, 70, True)])
@pytest.mark.parametrize("one_chunk", [True, False], ids=["whole-rows", "chunked"])
def test_norm_linear_matches_reference_fp32(norm_kind, activation, m, k, n, bias, one_chunk, monkeypatch):
    monkeypatch.setattr(decode_gemv, "MAX_ONE_CHUNK_ELEMS", 4096 if one_chunk else 0)
    g = torch.Generator().manual_seed(m * 100 + k + ACTIVATIONS.index(activation))
    x, norm = _rows(m, k, g), _norm(norm_kind, k, g)
    w, b = _linear(n, k, g, bias)
    gate = {}
    if activation == "swiglu":
        gw, gb = _linear(n, k, g, bias)
        gate = dict(gate_weight=gw, gate_bias=gb)
    got = norm_linear(x, norm, w, b, activation=activation, impl="triton", **gate)
    want = norm_linear_reference(x, norm, w, b, activation=activation, **gate)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("m,k,n,bias", [(1, 40, 50, True), (7, 96, 40, False), (16, 33, 20, True)])
def test_linear_residual_matches_reference_fp32(m, k, n, bias):
    g = torch.Generator().manual_seed(m + k + n)
    h, residual = _rows(m, k, g), _rows(m, n, g)
    w, b = _linear(n, k, g, bias)
    got = linear_residual(h, w, b, residual, impl="triton")
    torch.testing.assert_close(got, linear_residual_reference(h, w, b, residual), **FP32)
    torch.testing.assert_close(got - residual, torch.nn.functional.linear(h, w, b), **FP32)  # the add happened


@pytest.mark.parametrize("pos_table", [True, False], ids=["learned-positions", "no-positions"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_chunk", [True, False], ids=["whole-rows", "chunked"])
def test_embedding_prologue(pos_table, dtype, one_chunk, assert_close, monkeypatch):
    monkeypatch.setattr(decode_gemv, "MAX_ONE_CHUNK_ELEMS", 4096 if one_chunk else 0)
    g = torch.Generator().manual_seed(7)
    k, n, vocab, n_pos = 40, 30, 11, 9
    tok_w = torch.randn(vocab, k, generator=g).to(DEVICE, dtype)
    pos_w = torch.randn(n_pos, k, generator=g).to(DEVICE, dtype) if pos_table else None
    tokens = torch.tensor([3, 0, 10, 3], device=DEVICE)
    positions = torch.tensor([0, 8, 50, 2], device=DEVICE)  # 50 is past the table: clamped, as the model does
    emb = Embedding(tokens, positions, tok_w, pos_w)
    norm, (w, b) = _norm("layernorm", k, g, dtype), _linear(n, k, g, dtype=dtype)
    got, x = norm_linear(None, norm, w, b, embedding=emb, activation="gelu", impl="triton")
    want, x_ref = norm_linear_reference(None, norm, w, b, embedding=emb, activation="gelu")
    expected_x = tok_w[tokens] + (pos_w[positions.clamp(max=n_pos - 1)] if pos_table else 0)  # eager, rounded
    assert x.dtype == dtype
    assert_close(x, expected_x)  # one ulp in bf16 on CPU: the interpreter truncates where a GPU rounds
    torch.testing.assert_close(x_ref, expected_x, atol=0, rtol=0)
    assert_close(got, want)


def test_bf16_follows_eager_roundings(assert_close):
    # The model's eager bf16 step: norm -> bf16, linear -> bf16, gelu -> bf16, then a residual add in bf16.
    g = torch.Generator().manual_seed(3)
    m, k, n = 3, 64, 48
    x, norm = _rows(m, k, g, torch.bfloat16), _norm("layernorm", k, g, torch.bfloat16)
    w, b = _linear(n, k, g, dtype=torch.bfloat16)
    got = norm_linear(x, norm, w, b, activation="gelu", impl="triton")
    normed = torch.nn.functional.layer_norm(x, (k,), norm.weight, norm.bias, norm.eps)
    eager = torch.nn.functional.gelu(torch.nn.functional.linear(normed, w, b))
    assert got.dtype == torch.bfloat16
    assert_close(got, eager)
    w2, b2 = _linear(k, n, g, dtype=torch.bfloat16)
    assert_close(linear_residual(got, w2, b2, x, impl="triton"), x + torch.nn.functional.linear(got, w2, b2))


def test_float32_logits_from_bf16_weights():
    g = torch.Generator().manual_seed(4)
    x, norm = _rows(2, 32, g, torch.bfloat16), _norm("rmsnorm", 32, g, torch.bfloat16)
    w, _ = _linear(20, 32, g, dtype=torch.bfloat16)
    got = norm_linear(x, norm, w, None, out_dtype=torch.float32, impl="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, norm_linear_reference(x, norm, w, None, out_dtype=torch.float32), atol=3e-2, rtol=0)


def test_auto_takes_the_reference_on_cpu_and_for_many_rows():
    g = torch.Generator().manual_seed(5)
    x, norm = _rows(MAX_ROWS + 1, 16, g, device="cpu"), _norm("rmsnorm", 16, g, device="cpu")
    w, b = _linear(8, 16, g, device="cpu")
    torch.testing.assert_close(norm_linear(x, norm, w, b), norm_linear_reference(x, norm, w, b), atol=0, rtol=0)


def test_bad_inputs_are_named():
    g = torch.Generator().manual_seed(6)
    x, norm = _rows(2, 16, g), _norm("layernorm", 16, g)
    w, b = _linear(8, 16, g)
    with pytest.raises(ValueError, match="activation must be one of"):
        norm_linear(x, norm, w, b, activation="tanh")
    with pytest.raises(ValueError, match="norm kind must be one of"):
        NormParams("batchnorm", norm.weight, None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, K=16\)"):
        norm_linear(x, norm, w[:, :8], b)
    with pytest.raises(ValueError, match="gate_weight is given exactly when"):
        norm_linear(x, norm, w, b, activation="swiglu")
    with pytest.raises(ValueError, match="exactly one of x and embedding"):
        norm_linear(None, norm, w, b)
    with pytest.raises(ValueError, match="residual must have shape"):
        linear_residual(x, w, b, x)


@pytest.mark.parametrize("block_m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("block_k", [None, 512, 256])
def test_every_row_bucket_has_configs_within_the_register_budget(block_m, block_k):
    configs = _configs(block_m, block_k)
    assert configs
    for c in configs:
        product = block_m * c.kwargs["BLOCK_N"] * c.kwargs.get("BLOCK_K", block_k)
        assert product <= MAX_PRODUCT_PER_THREAD * 32 * c.num_warps or len(configs) == 1


@needs_gpu
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_shakespeare_widths_bf16_in_a_graph(m, assert_close, monkeypatch):
    monkeypatch.setattr(decode_gemv, "AUTOTUNE", True)
    # shakespeare-char: C 384, qkv 1152, MLP 1536, vocab 65; captured in a CUDA graph after the autotuning call.
    g = torch.Generator().manual_seed(m)
    c = 384
    x, norm = _rows(m, c, g, torch.bfloat16), _norm("layernorm", c, g, torch.bfloat16)
    w_up, b_up = _linear(4 * c, c, g, dtype=torch.bfloat16)
    w_down, b_down = _linear(c, 4 * c, g, dtype=torch.bfloat16)
    w_head, _ = _linear(65, c, g, dtype=torch.bfloat16)

    def step():
        h = norm_linear(x, norm, w_up, b_up, activation="gelu")
        y = linear_residual(h, w_down, b_down, x)
        return h, y, norm_linear(y, norm, w_head, None, out_dtype=torch.float32)

    eager = step()  # tunes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    h_ref = norm_linear_reference(x, norm, w_up, b_up, activation="gelu")
    y_ref = linear_residual_reference(h_ref, w_down, b_down, x)
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert_close(captured[0], h_ref)
    assert_close(captured[1], y_ref, scale=2)
    assert_close(captured[2], norm_linear_reference(y_ref, norm, w_head, None, out_dtype=torch.float32), scale=4)
