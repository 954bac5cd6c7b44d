"""Flash attention (Triton, forward and backward) against the PyTorch reference on fresh random inputs."""

import math

import pytest
import torch

from kernels.flash_attention import flash_attention, reference

GPU = torch.cuda.is_available()
# (B, H, H_kv, T, D): GQA, MHA and MQA; T not a multiple of the blocks in some, to cover the bounds masks.
SHAPES = (
    [(2, 8, 2, 256, 64), (1, 4, 4, 200, 32), (1, 4, 1, 333, 128), (2, 6, 6, 1024, 64)]
    if GPU
    else [(2, 4, 2, 32, 32), (1, 2, 2, 24, 16), (1, 4, 1, 40, 32)]
)
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]  # fp16: its own test below
GRAD_TOL_SCALE = 2.0  # gradients go through two more low-precision matmuls than the output


def _inputs(B, H, H_kv, T, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_()
    return make(B, H, T, D), make(B, H_kv, T, D), make(B, H_kv, T, D)


def _fwd_bwd(fn, q, k, v, do, **kw):
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, causal, dtype, device, assert_close):
    q, k, v = _inputs(*shape, dtype, device)
    do = torch.randn_like(q)
    fast = _fwd_bwd(flash_attention, q, k, v, do, causal=causal, impl="triton")
    # The reference runs in fp32 on fp32 copies: the truth the low-precision kernel is compared with.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _fwd_bwd(reference, q32, k32, v32, do.float(), causal=causal)
    assert fast[0].dtype == dtype and fast[0].shape == q.shape
    assert_close(fast[0], ref[0])
    for got, want in zip(fast[1:], ref[1:]):
        assert got.shape == want.shape
        assert_close(got, want, scale=GRAD_TOL_SCALE)


def test_fp16_through_interpreter_or_gpu(device, assert_close):
    q, k, v = _inputs(1, 4, 2, 32, 32, torch.float16, device, seed=1)
    do = torch.randn_like(q)
    fast = _fwd_bwd(flash_attention, q, k, v, do, impl="triton")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _fwd_bwd(reference, q32, k32, v32, do.float())
    for got, want in zip(fast, ref):
        assert_close(got, want, scale=GRAD_TOL_SCALE)


def test_strided_views_of_a_fused_qkv(device, assert_close):
    """q, k, v sliced out of one (B, T, 3, H, D) projection: strided, not contiguous; grads reach the parent."""
    B, T, H, D = 2, 24, 4, 32
    qkv = torch.randn(B, T, 3, H, D, device=device, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, impl="triton")
    do = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, do)
    out_ref = reference(q, k, v)
    (grad_ref,) = torch.autograd.grad(out_ref, qkv, do)
    assert_close(out, out_ref)
    assert_close(grad, grad_ref, scale=GRAD_TOL_SCALE)


def test_explicit_scale_and_default_scale(device, assert_close):
    q, k, v = _inputs(1, 2, 2, 16, 16, torch.float32, device, seed=2)
    with torch.no_grad():
        default = flash_attention(q, k, v, impl="triton")
        explicit = flash_attention(q, k, v, scale=1.0 / math.sqrt(16), impl="triton")
        other = flash_attention(q, k, v, scale=0.5, impl="triton")
        assert_close(other, reference(q, k, v, scale=0.5))
    torch.testing.assert_close(default, explicit)
    assert (other - default).abs().max() > 1e-3  # the scale is not ignored


def test_auto_on_cpu_is_the_reference():
    q, k, v = _inputs(1, 2, 1, 8, 16, torch.float32, "cpu", seed=3)
    torch.testing.assert_close(flash_attention(q, k, v), reference(q, k, v), atol=0, rtol=0)
    # Unsupported head dims fall back under "auto" and are refused when Triton is forced.
    q, k, v = _inputs(1, 2, 1, 8, 24, torch.float32, "cpu", seed=3)
    torch.testing.assert_close(flash_attention(q, k, v), reference(q, k, v), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not support"):
        flash_attention(q, k, v, impl="triton")


def test_bad_inputs_are_refused():
    q, k, v = _inputs(1, 6, 4, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="must divide"):
        flash_attention(q, k, v)
    q, k, v = _inputs(1, 4, 2, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl"):
        flash_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="T=8"):
        flash_attention(q, k[:, :, :4], v[:, :, :4])


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the trainer's and the bench's shapes in bf16")
@pytest.mark.parametrize("b,h,hkv,t", [(64, 6, 6, 256), (8, 6, 6, 256), (4, 12, 4, 1024), (1, 6, 6, 200)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_real_shapes_bf16_forward_and_backward(b, h, hkv, t, causal):
    """Real shapes (shakespeare-char's 6 heads at T 256, GQA at T 1024, a ragged T) against the fp32 reference."""
    torch.manual_seed(t + b)
    q = torch.randn(b, h, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(b, h, t, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # the eval path (no autograd graph) first
        out_eval = flash_attention(q, k, v, causal=causal)
    out = flash_attention(q, k, v, causal=causal)
    ref = reference(q.float(), k.float(), v.float(), causal=causal)
    for name, got in (("eval out", out_eval), ("out", out)):
        rel = (got.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, f"{name} differs by {rel:.2e} relative"
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    for name, got, want in zip("qkv", grads, ref_grads):
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 2e-2, f"d{name} differs by {rel:.2e} relative"


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the model's strided q, k, v at training shapes")
@pytest.mark.parametrize("t", [256, 1024])
def test_gpu_transposed_views_as_the_model_passes_them(t):
    """The model hands attention (B, T, H, D) projections transposed to (B, H, T, D): T stride H*D, not D."""
    torch.manual_seed(t)
    b, h, d = 8, 6, 64
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    assert q.stride(2) == h * d
    out = flash_attention(q, k, v, causal=True)
    ref = reference(q.float(), k.float(), v.float(), causal=True)
    assert (out.float() - ref).norm() / ref.norm() < 1e-2
