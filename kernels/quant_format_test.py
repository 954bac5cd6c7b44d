"""Tests for the INT8 / INT4 packing layout: round-trip error bounds, nibble order, bad arguments."""

import pytest
import torch

from kernels.quant_format import (
    INT4_GROUP_SIZES,
    INT4_ZERO_POINT,
    pack_int4,
    pack_int8,
    unpack_int4,
    unpack_int8,
)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3


def test_int8_round_trip_within_half_a_step():
    w = _weight(24, 80, seed=0)
    q, scale = pack_int8(w)
    assert q.dtype == torch.int8 and q.shape == (24, 80)
    assert scale.dtype == torch.float32 and scale.shape == (24,)
    err = (unpack_int8(q, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)
    # The largest magnitude of each row maps onto +-127 exactly.
    assert torch.equal(q.abs().amax(dim=1).long(), torch.full((24,), 127))


def test_int8_zero_row_round_trips_to_zero():
    w = _weight(4, 16, seed=1)
    w[2] = 0
    q, scale = pack_int8(w)
    assert torch.all(q[2] == 0) and torch.isfinite(scale).all()
    assert torch.all(unpack_int8(q, scale)[2] == 0)


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
def test_int4_round_trip_within_half_a_step(group_size):
    n, k = 8, 2 * group_size
    w = _weight(n, k, seed=group_size)
    packed, scales = pack_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert scales.dtype == torch.float32 and scales.shape == (n, k // group_size)
    w_hat = unpack_int4(packed, scales, group_size)
    bound = scales.repeat_interleave(group_size, dim=1) / 2 + 1e-6  # (N, K)
    assert torch.all((w_hat - w).abs() <= bound)


def test_int4_nibble_order_low_nibble_is_even_k():
    # Integer levels -7..7 cycle through both groups of 32, so max |w| == 7 and the scales are 1.
    group_size = 32
    q = torch.arange(64) % 15 - 7  # (64,)
    w = q.float()[None, :]  # (1, 64)
    packed, scales = pack_int4(w, group_size)
    assert torch.equal(scales, torch.ones(1, 2))
    u = (q + INT4_ZERO_POINT).to(torch.uint8)
    assert torch.equal(packed[0] & 0x0F, u[0::2])
    assert torch.equal(packed[0] >> 4, u[1::2])
    assert int(packed[0, 0]) == int(u[0]) | (int(u[1]) << 4)


def test_int4_zero_maps_to_zero_point():
    w = torch.zeros(2, 64)
    packed, scales = pack_int4(w, 32)
    assert torch.all(packed == (INT4_ZERO_POINT | INT4_ZERO_POINT << 4))
    assert torch.all(unpack_int4(packed, scales, 32) == 0)


@pytest.mark.parametrize("bad", [0, 16, 48, 256])
def test_int4_rejects_bad_group_size(bad):
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\)"):
        pack_int4(torch.randn(4, 256), bad)


def test_int4_rejects_k_not_divisible_by_group_size():
    with pytest.raises(ValueError, match=r"K=96.*divisible by group_size=64"):
        pack_int4(torch.randn(4, 96), 64)


def test_unpack_rejects_mismatched_scales():
    packed, scales = pack_int4(torch.randn(4, 128), 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        unpack_int4(packed, scales[:, :2], 32)
    q, scale = pack_int8(torch.randn(4, 8))
    with pytest.raises(ValueError, match="scale must have shape"):
        unpack_int8(q, scale[:3])


def test_bf16_input_is_accepted_and_scales_are_float32():
    w = _weight(8, 64, seed=3).bfloat16()
    packed, scales = pack_int4(w, 32)
    q, scale = pack_int8(w)
    assert scales.dtype == torch.float32 and scale.dtype == torch.float32
    bound = scales.repeat_interleave(32, dim=1) / 2 + 1e-6
    assert torch.all((unpack_int4(packed, scales, 32) - w.float()).abs() <= bound)
