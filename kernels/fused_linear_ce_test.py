"""Chunked linear + cross-entropy (PyTorch chunks, and the Triton in-place loss kernel) against F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from kernels.fused_linear_ce import linear_cross_entropy

GPU = torch.cuda.is_available()
# (N, C, V, chunk_size): chunks that divide N, that do not, and one chunk larger than N.
SHAPES = (
    [(4096, 768, 50304, 1024), (1000, 256, 1000, 384)] if GPU else [(24, 16, 50, 8), (19, 12, 37, 5), (6, 8, 70, 64)]
)
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]
IMPLS = ["auto", "triton"]


def _inputs(N, C, V, dtype, device, seed=0, ignore_every=5):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, C, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=gen, device=device) / C**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    targets[::ignore_every] = -1  # some ignored rows
    return hidden, weight, targets


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}C{}V{}chunk{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cross_entropy(shape, dtype, impl, device, assert_close):
    N, C, V, chunk = shape
    hidden, weight, targets = _inputs(N, C, V, dtype, device)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, impl=impl)
    dloss = torch.tensor(1.7, device=device)  # a non-unit upstream gradient
    dh, dw = torch.autograd.grad(loss, (hidden, weight), dloss)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = F.cross_entropy(h32 @ w32.t(), targets, ignore_index=-1)
    want_dh, want_dw = torch.autograd.grad(want, (h32, w32), dloss)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, want, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=1e-3)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close(dh, want_dh)
    assert_close(dw, want_dw)


def test_weight_only_and_custom_ignore_index(device, assert_close):
    hidden, weight, targets = _inputs(10, 8, 30, torch.float32, device, seed=1, ignore_every=100)
    targets[0] = 0  # no -1 rows here: 7 is the ignored class
    targets[3] = targets[8] = 7
    hidden = hidden.detach()  # no gradient wanted for hidden: only d(weight) is computed
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4, ignore_index=7)
    (dw,) = torch.autograd.grad(loss, (weight,))
    w32 = weight.detach().requires_grad_()
    want = F.cross_entropy(hidden @ w32.t(), targets, ignore_index=7)
    (want_dw,) = torch.autograd.grad(want, (w32,))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert_close(dw, want_dw)


def test_all_ignored_gives_zero_loss_and_grads(device):
    hidden, weight, targets = _inputs(6, 8, 20, torch.float32, device, seed=2)
    targets.fill_(-1)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_reference_and_bad_inputs():
    hidden, weight, targets = _inputs(6, 8, 20, torch.float32, "cpu", seed=3)
    torch.testing.assert_close(
        linear_cross_entropy(hidden, weight, targets, impl="reference"),
        F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1),
    )
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)


def test_under_autocast_matmuls_take_the_autocast_dtype():
    """fp32 hidden and weight under CPU bf16 autocast: bf16 matmuls inside, gradients in the inputs' dtypes."""
    hidden, weight, targets = _inputs(12, 16, 40, torch.float32, "cpu", seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1)
    want_dh, want_dw = torch.autograd.grad(want, (hidden, weight))
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    torch.testing.assert_close(loss, want, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dh, want_dh, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(dw, want_dw, atol=2e-2, rtol=5e-2)
    assert (dh - want_dh).abs().max() > 0  # bf16 matmuls did run: not bit-identical to fp32
