"""A benchmark case is validated, and the call it times takes gradients without accumulating them."""

import pytest
import torch

from kernels.bench_common import BenchCase, forward_call, graph_twins


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


def test_graph_twins_copy_each_case_as_graph_timed():
    cases = [_case("k", "triton", True, flops=2.0), _case("k", "sdpa", False, flops=2.0)]
    twins = graph_twins(cases, calls=3)
    assert [(t.kernel, t.shape, t.impl, t.ours, t.graph_calls, t.flops) for t in twins] == [
        ("k", "s graph", "triton", True, 3, 2.0),
        ("k", "s graph", "sdpa", False, 3, 2.0),
    ]
    assert all(c.graph_calls == 0 for c in cases)  # the lone-call cases are unchanged
