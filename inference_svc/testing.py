"""Helpers for tests that drive a live engine: wait for a condition, tell when the engine holds nothing, and a small
random model whose choices are clear (the speculative tests' target and draft)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from inference_svc.engine import Engine
from model.config import ModelConfig
from model.transformer import GPT

__all__ = ["SPECULATIVE_PROMPTS", "engine_idle", "sharp_gpt", "target_and_draft", "wait_until"]

SPECULATIVE_PROMPTS = ["to be", "or not to be: that", "t", "whether 'tis nobler in the", "the question. ", "suffer!"]

_LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_weights=False)


def sharp_gpt(seed: int, vocab: int, block_size: int, head_scale: float = 8.0, **kw) -> GPT:
    """A random-init Llama-style GPT (1 layer, 2 heads, width 16 unless `kw` says otherwise) in eval mode, its head
    scaled by `head_scale`: random init is near uniform, a sharper head makes its choices clear."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab, block_size=block_size, **{**dict(n_layer=1, n_head=2, n_kv_head=2, n_embd=16), **kw}, **_LLAMA
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `predicate` every 10 ms until it holds or `timeout` seconds pass; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def engine_idle(engine: Engine) -> bool:
    """Every slot free and no request queued, running or in flight."""
    s = engine.stats()
    return s.free_slots == s.max_slots and s.queued == s.running == s.in_flight == 0


def target_and_draft(vocab: int, draft_context: int) -> tuple[GPT, GPT]:
    """A 2-layer `sharp_gpt` target with a 64-token context, and a noisy copy of it with `draft_context` tokens as
    the draft (RoPE: the weights do not depend on the context length): it agrees with the target often, not always."""
    target = sharp_gpt(3, vocab, 64, n_layer=2, n_head=4, n_embd=32)
    draft = sharp_gpt(3, vocab, draft_context, n_layer=2, n_head=4, n_embd=32)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return target, draft
