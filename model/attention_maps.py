"""Attention weights of every layer and head, for looking at what a trained model attends to.

The model's attention runs through fused SDPA, which never materialises the weights; here one ordinary forward pass
runs with a pre-hook on each block's `Attention` that records what it was given (its normed input and the RoPE
tables), and the weights are recomputed from that module's own q/k projections with an explicit softmax. Nothing
in `model/transformer.py` changes, and LoRA-wrapped projections work as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from model.layers import apply_rope
from model.transformer import GPT

__all__ = ["attention_maps", "attention_weights"]


def attention_weights(attn: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) of one `model.transformer.Attention` for its input x (B, T, C) and rope
    tables (or None). Returns (B, n_head, T, T) float32; K heads are shared by their query group (GQA / MQA)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # (B, H, T, D)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(attn.head_dim)  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Attention weights of one sequence idx (T,) or (1, T): (n_layer, n_head, T, T) float32, row t = query t
    (rows sum to 1; key positions after t are 0). Runs in eval mode (no dropout) and restores the mode after."""
    idx = idx[None] if idx.dim() == 1 else idx
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"idx must have shape (T,) or (1, T), got {tuple(idx.shape)}")
    T = idx.shape[1]
    if not 1 <= T <= model.config.block_size:
        raise ValueError(f"sequence length must be in [1, {model.config.block_size}] (block_size), got {T}")
    inputs: list[tuple[torch.Tensor, Any]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        rope = args[1] if len(args) > 1 else kwargs.get("rope")
        inputs.append((x, rope))

    was_training = model.training
    model.eval()
    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in model.blocks]
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    maps = [attention_weights(block.attn, x, rope) for block, (x, rope) in zip(model.blocks, inputs)]
    return torch.stack(maps)[:, 0]  # (n_layer, H, T, T)
