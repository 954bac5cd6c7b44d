"""Fused SwiGLU (Triton) against the PyTorch reference, forward and backward."""

import pytest
import torch

from kernels.swiglu import reference, swiglu

GPU = torch.cuda.is_available()
SHAPES = [(4, 1000, 2048), (3, 7, 11)] if GPU else [(3, 50), (2, 5, 40)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if GPU else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype, device, assert_close):
    gen = torch.Generator(device=device).manual_seed(0)
    gate = (3 * torch.randn(*shape, generator=gen, device=device)).to(dtype).requires_grad_()  # both silu tails
    up = torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_()
    dout = torch.randn(*shape, generator=gen, device=device).to(dtype)
    out = swiglu(gate, up, impl="triton")
    grads = torch.autograd.grad(out, (gate, up), dout)
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    want = reference(g32, u32)
    want_grads = torch.autograd.grad(want, (g32, u32), dout.float())
    assert out.dtype == dtype and out.shape == gate.shape
    assert_close(out, want)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == dtype
        assert_close(got, exp)


def test_non_contiguous_inputs(device, assert_close):
    h = torch.randn(6, 2 * 24, device=device, requires_grad=True)
    gate, up = h[:, :24], h[:, 24:]  # the usual split of one fused up-projection
    out = swiglu(gate, up, impl="triton")
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, h, dout)
    (want,) = torch.autograd.grad(reference(gate, up), h, dout)
    assert_close(grad, want)


def test_auto_on_cpu_and_bad_inputs():
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(swiglu(gate, up), reference(gate, up), atol=0, rtol=0)
    with pytest.raises(ValueError, match="share shape"):
        swiglu(gate, up[:, :4])
