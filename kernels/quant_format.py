"""The one weight-only quantization layout of tinylm: INT8 per channel, INT4 per group.

Every producer and consumer of quantized weights uses these functions and this layout: the PyTorch
module swap (`model/quantize.py`), the Triton matmuls (`kernels/wo_matmul.py`) and the exporters
(ONNX `MatMulNBits` follows the same idea: uint8 blobs, low nibble first, zero point 8).

A linear layer's weight is `w` of shape (N, K) = (out_features, in_features), as in `nn.Linear`;
`y = x @ w.T`. Quantization is symmetric and weight-only; activations stay in floating point.

INT8, per output channel:
    q      int8    (N, K)   values in -127..127 (-128 is never produced), row-major, contiguous
    scale  float32 (N,)     scale[n] = max_k |w[n, k]| / 127   (1.0 for an all-zero row)
    w[n, k] ~= q[n, k] * scale[n]

INT4, per group of `group_size` consecutive input features (group_size in 32, 64, 128; K % group_size == 0):
    packed uint8   (N, K // 2)            row-major, contiguous; byte j of row n holds k = 2j and k = 2j + 1:
                                          low nibble  (bits 0..3) = u[n, 2j]      (even k first)
                                          high nibble (bits 4..7) = u[n, 2j + 1]
    u      unsigned 4-bit, 0..15          u = q + 8: zero point 8, q = round(w / s) clamped to -8..7
                                          (the rounding yields -7..7; 0 means u == 8)
    scales float32 (N, K // group_size)   scales[n, g] = max |w[n, g*group_size : (g+1)*group_size]| / 7
                                          (1.0 for an all-zero group)
    w[n, k] ~= (u[n, k] - 8) * scales[n, k // group_size]

ONNX `MatMulNBits` (bits=4, block_size=group_size) reads the same bytes: its B input is `packed` viewed as
(N, K // group_size, group_size // 2), its scales are `scales` flattened, and its default zero point is 8.

The worst-case round-trip error is half a step: |w - dequant(w)| <= scale / 2 per element.
"""

from __future__ import annotations

import torch

__all__ = [
    "INT4_GROUP_SIZES",
    "INT4_ZERO_POINT",
    "INT4_QMAX",
    "INT8_QMAX",
    "check_group_size",
    "pack_int8",
    "unpack_int8",
    "pack_int4",
    "unpack_int4",
]

INT8_QMAX = 127  # symmetric: -127..127, so the scale maps max |w| onto 127 exactly
INT4_QMAX = 7  # symmetric: -7..7 before the zero point is added
INT4_ZERO_POINT = 8  # stored nibble u = q + 8, in 0..15
INT4_GROUP_SIZES = (32, 64, 128)


def check_group_size(group_size: int, in_features: int) -> None:
    """Raise ValueError unless `group_size` is allowed and divides `in_features` (K)."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size != 0:
        raise ValueError(f"in_features (K={in_features}) must be divisible by group_size={group_size}")


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating tensor (N, K), got {w.dim()}-D {w.dtype}")


def _absmax_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """absmax / qmax, with 1.0 where the block is all zeros (so q = 0 and w = 0 round-trip)."""
    scale = absmax / qmax
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def pack_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w (N, K) to int8 per output channel: returns (q int8 (N, K), scale float32 (N,))."""
    _check_weight(w)
    w = w.detach().float()
    scale = _absmax_scale(w.abs().amax(dim=1), INT8_QMAX)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def unpack_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantize int8 q (N, K) with scale (N,) to float32 (N, K)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be a 2-D int8 tensor (N, K), got {q.dim()}-D {q.dtype}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"scale must have shape (N,)=({q.shape[0]},), got {tuple(scale.shape)}")
    return q.float() * scale.float()[:, None]


def pack_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w (N, K) to 4 bits per group along K.

    Returns (packed uint8 (N, K // 2), scales float32 (N, K // group_size)); see the module docstring.
    """
    _check_weight(w)
    n, k = w.shape
    check_group_size(group_size, k)
    w = w.detach().float().reshape(n, k // group_size, group_size)  # (N, G, group_size)
    scales = _absmax_scale(w.abs().amax(dim=2), INT4_QMAX)  # (N, G)
    q = torch.round(w / scales[:, :, None]).clamp_(-INT4_ZERO_POINT, INT4_QMAX)
    u = (q + INT4_ZERO_POINT).to(torch.uint8).reshape(n, k)  # (N, K) in 0..15
    packed = u[:, 0::2] | (u[:, 1::2] << 4)  # (N, K // 2): even k low, odd k high
    return packed.contiguous(), scales.contiguous()


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantize packed uint8 (N, K // 2) with scales (N, K // group_size) to float32 (N, K)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor (N, K // 2), got {packed.dim()}-D {packed.dtype}")
    n, k = packed.shape[0], packed.shape[1] * 2
    check_group_size(group_size, k)
    if scales.shape != (n, k // group_size):
        raise ValueError(
            f"scales must have shape (N, K // group_size)=({n}, {k // group_size}), got {tuple(scales.shape)}"
        )
    low = (packed & 0x0F).to(torch.int16)  # k = 2j
    high = (packed >> 4).to(torch.int16)  # k = 2j + 1
    u = torch.stack((low, high), dim=-1).reshape(n, k)  # (N, K), interleaved back to k order
    q = (u - INT4_ZERO_POINT).float().reshape(n, k // group_size, group_size)
    return (q * scales.float()[:, :, None]).reshape(n, k)
