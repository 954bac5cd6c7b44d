"""Attention maps: proper causal distributions that reproduce each block's attention output."""

from __future__ import annotations

import pytest
import torch

from model.attention_maps import attention_maps
from model.config import ModelConfig
from model.lora import apply_lora
from model.testing import llama_test_config
from model.transformer import GPT

CONFIGS = {
    "llama-gqa-rope": llama_test_config(vocab_size=40, block_size=16, n_layer=3),
    "gpt2-mha-learned": ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.1),
}


def _model(name: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(CONFIGS[name])
    with torch.no_grad():
        for block in model.blocks:  # random init gives near-uniform maps: sharpen q so the weights vary
            block.attn.q_proj.weight.mul_(20.0)
    return model


def _attention_io(model: GPT, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block's attention module in one forward pass."""
    seen = []
    handles = [b.attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_are_causal_distributions(name):
    model = _model(name)
    T = 11
    maps = attention_maps(model, torch.randint(0, 40, (T,)))
    cfg = model.config
    assert maps.shape == (cfg.n_layer, cfg.n_head, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(cfg.n_layer, cfg.n_head, T))
    assert torch.all(maps.triu(1) == 0)
    assert torch.all(maps >= 0)
    assert maps[..., 1:, :].std() > 0.05  # not uniform: the test below can tell weights apart


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weights_times_values_reproduce_the_attention_output(name):
    model = _model(name).eval()
    idx = torch.randint(0, 40, (1, 12))
    maps = attention_maps(model, idx)  # (L, H, T, T)
    assert not model.training
    for layer, (block, (x, out)) in enumerate(zip(model.blocks, _attention_io(model, idx))):
        attn = block.attn
        v = attn.v_proj(x).view(1, 12, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (1, Hkv, T, D)
        v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)[0]  # (H, T, D)
        y = (maps[layer] @ v).transpose(0, 1).reshape(1, 12, -1)  # (1, T, C)
        torch.testing.assert_close(attn.o_proj(y), out, atol=1e-5, rtol=1e-4)


def test_works_with_lora_and_restores_training_mode():
    model = _model("llama-gqa-rope")
    apply_lora(model, rank=2, alpha=4.0, targets=("q", "k", "v", "o"))
    model.train()
    maps = attention_maps(model, torch.arange(8)[None])
    assert maps.shape == (3, 4, 8, 8) and model.training


def test_bad_inputs():
    model = _model("gpt2-mha-learned")
    with pytest.raises(ValueError, match=r"idx must have shape \(T,\) or \(1, T\)"):
        attention_maps(model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sequence length must be in \[1, 16\]"):
        attention_maps(model, torch.zeros(17, dtype=torch.long))
