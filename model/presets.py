"""Named model sizes. `get_preset(name, **overrides)` is how everything else asks for one.

Two families:
- nanoGPT / GPT-2 style (`shakespeare-char`, `gpt2-124m`): LayerNorm, learned positions, GELU MLP,
  biases, tied embeddings. `shakespeare-char` is nanoGPT's "baby GPT" (~10.7M parameters at vocab 65).
- Llama style (`tiny`, `small`, `medium`, `large`): RMSNorm, RoPE, SwiGLU, no biases, grouped-query
  attention (n_kv_head = n_head / 2 or fewer, halving the KV cache), tied embeddings (at these sizes the
  embedding is a large share of the parameters, and tying helps small-data training).
- `shakespeare-char-muon`: the baby GPT's shape with modded-nanogpt's changes that cost no parameters: QK-norm, a
  ReLU² MLP, and an untied head (+25k parameters at vocab 65); trained with Muon (trainer preset of the same name).
  `shakespeare-char-muon-l8` (8 x 336, 11.0M) and `-l10` (10 x 288, 10.1M) spend about its parameters deeper and
  narrower (train them as `shakespeare-char-muon` with `preset=` changed).

`vocab_size` is the size of the tokenizer each preset is meant for (bytes for `tiny`, a small BPE for
`small`, GPT-2's 50257 padded to a multiple of 64 for the rest); the trainer overrides it with its
tokenizer's size: `get_preset("small", vocab_size=tok.vocab_size)`.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.field_checks import check_choice

__all__ = ["PRESETS", "get_preset"]

_NANOGPT = dict(bias=True, norm="layernorm", pos="learned", mlp="gelu", tie_weights=True)
_LLAMA = dict(bias=False, norm="rmsnorm", pos="rope", mlp="swiglu", tie_weights=True, rope_theta=10000.0)

PRESETS: dict[str, ModelConfig] = {
    "shakespeare-char": ModelConfig(
        vocab_size=65, n_layer=6, n_head=6, n_kv_head=6, n_embd=384, block_size=256, dropout=0.2, **_NANOGPT
    ),
    "shakespeare-char-muon": ModelConfig(
        vocab_size=65,
        n_layer=6,
        n_head=6,
        n_kv_head=6,
        n_embd=384,
        block_size=256,
        dropout=0.2,
        **{**_NANOGPT, "mlp": "relu2", "tie_weights": False, "qk_norm": True},
    ),
    "tiny": ModelConfig(
        vocab_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, dropout=0.0, **_LLAMA
    ),
    "small": ModelConfig(
        vocab_size=4096, n_layer=6, n_head=8, n_kv_head=4, n_embd=256, block_size=256, dropout=0.1, **_LLAMA
    ),
    "medium": ModelConfig(
        vocab_size=50304, n_layer=12, n_head=8, n_kv_head=4, n_embd=512, block_size=512, dropout=0.1, **_LLAMA
    ),
    "large": ModelConfig(
        vocab_size=50304, n_layer=24, n_head=12, n_kv_head=4, n_embd=768, block_size=1024, dropout=0.0, **_LLAMA
    ),
    "gpt2-124m": ModelConfig(
        vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768, block_size=1024, dropout=0.0, **_NANOGPT
    ),
}
# the Muon recipe's parameter budget (~10.7M) spent deeper and narrower, for the 60 s val target (issue 16)
PRESETS.update({
    f"shakespeare-char-muon-l{layers}": PRESETS["shakespeare-char-muon"].replace(n_layer=layers, n_embd=width)
    for layers, width in ((8, 336), (10, 288))
})  # fmt: skip


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset called `name`, with `overrides` applied (validated); unknown name -> ValueError.

    Overriding `n_head` alone keeps the preset's query-heads-per-KV-head ratio (MHA stays MHA).
    """
    check_choice("preset", name, sorted(PRESETS))
    base = PRESETS[name]
    if "n_head" in overrides and "n_kv_head" not in overrides:
        group = base.n_head // base.n_kv_head
        n_head = overrides["n_head"]
        if isinstance(n_head, int) and n_head % group == 0:
            overrides["n_kv_head"] = n_head // group
    return base.replace(**overrides) if overrides else base
