"""Gradient checkpointing gives the same loss and gradients as the plain forward, while keeping fewer activations;
`set_dropout` reaches every dropout of the model."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.transformer import GPT

LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=2)
NANOGPT = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)


def _model(flavour: dict, dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=37, n_layer=3, n_head=4, n_embd=32, block_size=16, dropout=dropout, **flavour)
    return GPT(config).train()


def _loss_and_grads(model: GPT, idx: torch.Tensor, on: bool, seed: int = 1) -> tuple[torch.Tensor, dict]:
    model.gradient_checkpointing = on
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on and off
    _, loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flavour", [LLAMA, NANOGPT], ids=["llama", "nanogpt"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_same_loss_and_gradients_on_and_off(flavour, dropout):
    model = _model(flavour, dropout)
    idx = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(2))
    loss_off, grads_off = _loss_and_grads(model, idx, on=False)
    loss_on, grads_on = _loss_and_grads(model, idx, on=True)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_fewer_activations_for_backward():
    model = _model(NANOGPT)
    idx = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(3))

    def saved_bytes(on: bool) -> int:
        model.gradient_checkpointing = on
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        return total

    off, on = saved_bytes(False), saved_bytes(True)
    assert on < off / 2, (on, off)  # 3 blocks keep only their inputs (the weights are saved either way)


def test_checkpointing_only_in_a_training_forward_with_grad(monkeypatch):
    model = _model(LLAMA)
    model.gradient_checkpointing = True
    idx = torch.randint(0, 37, (2, 8))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr("model.transformer.checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(idx)
    model.eval()
    model(idx)
    assert calls == []
    model.train()
    model(idx)
    assert len(calls) == model.config.n_layer


def test_set_dropout_reaches_every_dropout():
    model = _model(NANOGPT, dropout=0.1)
    model.set_dropout(0.35)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 + 2 * model.config.n_layer
    assert all(m.p == 0.35 for m in dropouts)
    assert all(block.attn.dropout == 0.35 for block in model.blocks)
    assert model.config.dropout == 0.1  # the config records what the model was built with
    with pytest.raises(AssertionError, match="dropout"):
        model.set_dropout(1.0)
