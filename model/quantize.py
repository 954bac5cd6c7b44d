"""Weight-only quantization as a module swap (gpt-fast style): `nn.Linear` -> `Int8Linear` / `Int4Linear`.

The model code is untouched; each linear layer's weight is packed in the one tinylm layout
(`kernels/quant_format.py`) and multiplied by `kernels/wo_matmul.py` (fused Triton on CUDA at decode
sizes, dequantise-and-matmul elsewhere). Activations, embeddings and norms stay in floating point.
A tied LM head gets its own quantized copy; the token embedding it was tied to stays float.

Accuracy, as stated and checked by `quantize_test.py`:
- per layer, a hard bound from the layout's half-step rounding: |y_q[n] - y[n]| <= sum_k |x[k]| * s[n, k] / 2
  (s = the scale of w[n, k]'s channel or group), up to float rounding;
- whole model (a randomly initialised 2-layer `tiny`, fp32; Gaussian weights are a hard case for 4 bits):
  relative logit error ||logits_q - logits|| / ||logits|| <= 2% for int8, <= 20% for int4 with
  group_size 32 and <= 25% with 128.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kernels.quant_format import INT4_GROUP_SIZES, pack_int4, pack_int8
from kernels.wo_matmul import int4_matmul, int8_matmul
from model.field_checks import check_choice

__all__ = ["Int8Linear", "Int4Linear", "quantize_model", "MODES"]

log = logging.getLogger(__name__)

MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, with q int8 (N, K) and scale float32 (N,) as buffers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        m.q, m.scale = pack_int8(w)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.q, self.scale)  # (..., N)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """y = x @ dequant(packed, scales).T + bias, with 4-bit weights in groups of `group_size` along K:
    packed uint8 (N, K // 2), scales float32 (N, K // group_size) as buffers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales", torch.ones(out_features, in_features // group_size, dtype=torch.float32, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device, w.dtype)
        m.packed, m.scales = pack_int4(w, group_size)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self.packed, self.scales, self.group_size)  # (..., N)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 32) -> nn.Module:
    """Swap every `nn.Linear` of `model` for its quantized version, IN PLACE, and return the same model.

    int4 needs in_features % group_size == 0; a layer that does not fit stays float (logged), and so
    does `model` itself if it is a bare `nn.Linear` (swap it with `Int8Linear.from_linear`).
    Copy first (`copy.deepcopy`) to keep the float model.
    """
    check_choice("mode", mode, MODES)
    if mode == "int4":
        check_choice("group_size", group_size, INT4_GROUP_SIZES)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and name]
    for name, linear in targets:
        if mode == "int4" and linear.in_features % group_size != 0:
            log.warning(
                "%s: in_features=%d not divisible by group_size=%d; left in float", name, linear.in_features, group_size
            )
            continue
        new = Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, group_size)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
