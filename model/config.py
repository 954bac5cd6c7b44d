"""The model's shape and flavour: one frozen, validated dataclass, loadable from and savable to YAML/JSON.

A config is checked once, in `__post_init__`; a bad value raises ValueError naming the field and the
allowed range, so every caller (CLI, trainer, gRPC services) gets the same message.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from model.field_checks import check_bool, check_choice, check_int, check_number

__all__ = ["ModelConfig", "NORMS", "POSITIONS", "MLPS"]

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu", "relu2")

# Upper bounds keep obviously wrong values (a typo'd 10x) out; they are far above any preset.
_MAX_VOCAB = 1 << 20
_MAX_LAYERS = 512
_MAX_HEADS = 1024
_MAX_EMBD = 1 << 16
_MAX_BLOCK = 1 << 20


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (see `model/transformer.py`).

    Defaults are GPT-2 124M as trained by nanoGPT. `n_kv_head=None` means "same as n_head" (MHA) and is
    resolved at construction, so the stored value is always an int. `mlp_hidden=0` means automatic:
    4 * n_embd for GELU and ReLU² (relu2: relu(x)**2, modded-nanogpt's MLP), and 8/3 * n_embd rounded up to a multiple of 64 for SwiGLU (Llama's rule,
    which keeps the parameter count of a 4x GELU MLP).
    """

    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    block_size: int = 1024
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    pos: str = "learned"
    mlp: str = "gelu"
    tie_weights: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    mlp_hidden: int = 0
    qk_norm: bool = False  # RMS-normalise q and k per head (no learned scale), before RoPE: modded-nanogpt's QK-norm

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, 1, _MAX_VOCAB)
        check_int("n_layer", self.n_layer, 1, _MAX_LAYERS)
        check_int("n_head", self.n_head, 1, _MAX_HEADS)
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        check_int("n_kv_head", self.n_kv_head, 1, self.n_head)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_kv_head must divide n_head={self.n_head} (MHA: n_head, GQA: a divisor, MQA: 1), "
                f"got {self.n_kv_head}"
            )
        check_int("n_embd", self.n_embd, 1, _MAX_EMBD)
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd must be a multiple of n_head={self.n_head}, got {self.n_embd}")
        check_int("block_size", self.block_size, 1, _MAX_BLOCK)
        check_number("dropout", self.dropout, 0.0, 1.0, lo_open=False, hi_open=True)
        check_bool("bias", self.bias)
        check_choice("norm", self.norm, NORMS)
        check_choice("pos", self.pos, POSITIONS)
        check_choice("mlp", self.mlp, MLPS)
        check_bool("tie_weights", self.tie_weights)
        check_bool("qk_norm", self.qk_norm)
        check_number("norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True, hi_open=True)
        check_number("rope_theta", self.rope_theta, 0.0, 1e12, lo_open=True, hi_open=False)
        check_int("mlp_hidden", self.mlp_hidden, 0, 16 * _MAX_EMBD)
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"n_embd / n_head (head_dim) must be even with pos='rope', got {self.head_dim}")
        # Floats given as ints in YAML/JSON (e.g. `dropout: 0`) are stored as floats so that
        # equal configs compare and serialise equal.
        for name in ("dropout", "norm_eps", "rope_theta"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def head_dim(self) -> int:
        """Width of one attention head: n_embd // n_head."""
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection: n_kv_head * head_dim."""
        return self.n_kv_head * self.head_dim

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width, resolving `mlp_hidden=0` (automatic)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, in declaration order (JSON/YAML safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a dict; unknown keys raise ValueError (a typo should not pass silently)."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as a flat YAML mapping."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        """Read a config written by `to_yaml` (or by hand: missing fields take their defaults)."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})
