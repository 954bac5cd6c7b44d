"""Tests of the weight-only quantization module swap against the float model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from kernels.quant_format import unpack_int4, unpack_int8
from model.presets import get_preset
from model.quantize import Int4Linear, Int8Linear, quantize_model
from model.transformer import GPT


@pytest.fixture(scope="module")
def float_model() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("tiny", n_layer=2)).eval()


def _rel_err(mode: str, group_size: int, model: GPT) -> float:
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    q = quantize_model(copy.deepcopy(model), mode, group_size)
    with torch.no_grad():
        ref, out = model(idx)[0], q(idx)[0]
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("mode, group_size, bound", [("int8", 32, 0.02), ("int4", 32, 0.20), ("int4", 128, 0.25)])
def test_model_logits_within_stated_bounds(float_model, mode, group_size, bound):
    err = _rel_err(mode, group_size, float_model)
    assert 0 < err <= bound, f"{mode}/{group_size}: relative logit error {err:.4f} > {bound}"


def test_int4_coarser_groups_not_better(float_model):
    assert (
        _rel_err("int8", 32, float_model)
        < _rel_err("int4", 32, float_model)
        <= _rel_err("int4", 128, float_model) * 1.05
    )


def test_swap_is_in_place_and_complete(float_model):
    model = copy.deepcopy(float_model)
    out = quantize_model(model, "int4", 64)
    assert out is model
    assert not any(type(m) is nn.Linear for m in model.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in float_model.modules())
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == n_linear
    assert isinstance(model.tok_emb, nn.Embedding)  # embedding stays float
    assert "blocks.0.attn.q_proj.packed" in model.state_dict()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_layer_error_within_half_step_bound(mode):
    torch.manual_seed(1)
    linear = nn.Linear(128, 48, bias=True)
    x = torch.randn(5, 128)
    if mode == "int8":
        q = Int8Linear.from_linear(linear)
        s = q.scale[:, None].expand(48, 128)  # (N, K)
        w_deq = unpack_int8(q.q, q.scale)
    else:
        q = Int4Linear.from_linear(linear, 32)
        s = q.scales.repeat_interleave(32, dim=1)  # (N, K)
        w_deq = unpack_int4(q.packed, q.scales, 32)
    with torch.no_grad():
        y, y_q = linear(x), q(x)
    bound = x.abs() @ (s / 2).T  # (M, N)
    assert bool(((y_q - y).abs() <= bound + 1e-5).all())
    # The module is exactly "dequantise, then linear" (the CPU path of kernels.wo_matmul).
    torch.testing.assert_close(y_q, x @ w_deq.T + linear.bias.detach(), rtol=1e-6, atol=1e-6)


def test_int4_leaves_indivisible_layers_float():
    model = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 8))
    quantize_model(model, "int4", 32)
    assert isinstance(model[0], Int4Linear) and type(model[1]) is nn.Linear


def test_bad_mode_and_group():
    with pytest.raises(ValueError, match=r"mode must be one of \['int8', 'int4'\]"):
        quantize_model(nn.Linear(32, 32), "int2")
    with pytest.raises(ValueError, match=r"group_size must be one of \[32, 64, 128\]"):
        quantize_model(nn.Linear(32, 32), "int4", 16)
