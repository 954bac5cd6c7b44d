"""A benchmark case is validated, and the call it times takes gradients without accumulating them."""

import pytest
import torch

from kernels.bench_common import BenchCase, forward_call


def _case(kernel, impl, ours, **kw):
    return BenchCase(kernel=kernel, shape="s", impl=impl, ours=ours, setup=lambda: lambda: None, **kw)


def test_bench_case_is_validated():
    with pytest.raises(ValueError, match="kernel"):
        _case("", "triton", True)
    with pytest.raises(ValueError, match="flops"):
        _case("k", "triton", True, flops=-1.0)


def test_forward_call_takes_gradients_without_accumulating():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    run = forward_call(lambda a, b: (a * b).sum(-1), (x, w), backward=True)
    gx, gw = run()
    gx2, _ = run()
    assert gx.shape == x.shape and gw.shape == w.shape and gx.abs().sum() > 0
    torch.testing.assert_close(gx, gx2)  # same output gradient every call
    assert x.grad is None and w.grad is None
    out = forward_call(lambda a, b: a * b, (x, w), backward=False)()
    assert not out.requires_grad
