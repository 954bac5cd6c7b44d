"""Tests of LoRA: only adapters train, merge equals the adapted forward, unmerge restores, removal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from model.artifact import load_artifact, save_artifact
from model.lora import LoRALinear, apply_lora, lora_parameters, lora_state_dict, merge_lora, remove_lora, unmerge_lora
from model.tokenizers import ByteTokenizer
from model.testing import llama_test_config
from model.transformer import GPT

CONFIG = llama_test_config(vocab_size=256, block_size=16)


def _trained_lora(targets=("q", "k", "v", "o")) -> tuple[GPT, GPT, torch.Tensor]:
    """(float model, adapted copy after a few steps, a batch)."""
    torch.manual_seed(0)
    base = GPT(CONFIG).eval()
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=targets)
    idx = torch.randint(0, 256, (2, 12))
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5)
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base, model.eval(), idx


def test_starts_at_base_model():
    torch.manual_seed(0)
    base = GPT(CONFIG).eval()
    model = apply_lora(copy.deepcopy(base), rank=2, alpha=4)
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], base(idx)[0], rtol=0, atol=0)


def test_only_adapters_train():
    base, model, _ = _trained_lora()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(lora_parameters(model)) == 2 * 4 * CONFIG.n_layer
    frozen = {n.replace(".base", ""): p for n, p in model.named_parameters() if ".lora_" not in n}
    for n, p in base.named_parameters():
        assert torch.equal(frozen[n], p), n
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert set(lora_state_dict(model)) == {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_merge_equals_adapted_forward_and_unmerge_restores():
    base, model, idx = _trained_lora(targets=("q", "v", "gate", "down"))
    with torch.no_grad():
        adapted = model(idx)[0]
        merge_lora(model)
        merged = model(idx)[0]
        torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(adapted, base(idx)[0], atol=1e-4)
        unmerge_lora(model)
        torch.testing.assert_close(model(idx)[0], adapted, rtol=1e-5, atol=1e-5)
    q = model.blocks[0].attn.q_proj
    assert isinstance(q, LoRALinear) and not q.merged
    torch.testing.assert_close(q.base.weight, base.blocks[0].attn.q_proj.weight, rtol=0, atol=1e-6)


def test_remove_lora_gives_plain_savable_model(tmp_path):
    _, model, idx = _trained_lora()
    with torch.no_grad():
        adapted = model(idx)[0]
    remove_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    path = tmp_path / save_artifact(tmp_path, model, ByteTokenizer(), name="ft", preset="custom", metrics={})
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(path).model(idx)[0], adapted, rtol=1e-5, atol=1e-5)


def test_save_refuses_unmerged_lora(tmp_path):
    from model.artifact import ArtifactError

    _, model, _ = _trained_lora()
    with pytest.raises(ArtifactError, match="merge LoRA adapters first"):
        save_artifact(tmp_path, model, ByteTokenizer(), name="x", preset="p", metrics={})


def test_bad_arguments():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        apply_lora(model, rank=0, alpha=1)
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        apply_lora(model, rank=2, alpha=0)
    with pytest.raises(
        ValueError, match=r"targets must be a non-empty subset of \['down', 'gate', 'k', 'o', 'q', 'up', 'v'\]"
    ):
        apply_lora(model, rank=2, alpha=1, targets=("qkv",))
    with pytest.raises(ValueError, match="no linear layer named"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), rank=2, alpha=1)
    apply_lora(model, rank=2, alpha=1)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2, alpha=1)
