"""LoRA (Hu et al., 2021) as a module swap: chosen `nn.Linear` layers get a trainable low-rank update.

    y = W x + (alpha / rank) * B (A x),   A (rank, in) random, B (out, rank) zeros, so training starts at W.

`apply_lora` freezes every other parameter; `merge_lora` folds B A into W (one matmul per layer at
inference again), `unmerge_lora` takes it back out; `remove_lora` merges and restores plain
`nn.Linear` layers, which is what `save_artifact` wants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from model.field_checks import check_int, check_number

__all__ = [
    "LoRALinear",
    "LORA_TARGETS",
    "apply_lora",
    "merge_lora",
    "unmerge_lora",
    "remove_lora",
    "lora_parameters",
    "lora_state_dict",
]

# Short target names -> the layer names in model/transformer.py.
LORA_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


class LoRALinear(nn.Module):
    """A frozen `base` linear layer plus a trainable rank-`rank` update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and the LoRA paper's code
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (merged or not), for code that reads `layer.weight`."""
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """The update (alpha / rank) * B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] = ("q", "k", "v", "o"),
    dropout: float = 0.0,
) -> nn.Module:
    """Wrap the target linear layers of `model` IN PLACE and freeze everything but the adapters.

    targets: short names (q, k, v, o, gate, up, down) or layer names (q_proj, ...). Returns `model`.
    """
    check_int("rank", rank, 1)
    check_number("alpha", alpha, 0, lo_open=True)
    check_number("dropout", dropout, 0, 1, hi_open=True)
    allowed = set(LORA_TARGETS) | set(LORA_TARGETS.values())
    unknown = [t for t in targets if t not in allowed]
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {sorted(LORA_TARGETS)}, got {list(targets)}")
    if _lora_layers(model):
        raise ValueError("model already has LoRA adapters (call remove_lora first)")
    layer_names = {LORA_TARGETS.get(t, t) for t in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = 0
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if child in layer_names and type(module) is nn.Linear:
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, float(alpha), dropout))
            swapped += 1
    if swapped == 0:
        raise ValueError(f"no linear layer named {sorted(layer_names)} in the model")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward unchanged, one matmul per layer)."""
    for layer in _lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (the base weights come back up to float rounding)."""
    for layer in _lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain `nn.Linear` layers back (all parameters trainable again)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRA layer): what the optimizer should get."""
    return [p for layer in _lora_layers(model) for p in (layer.lora_A, layer.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of the state dict (small; saved beside the base artifact's id)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}
