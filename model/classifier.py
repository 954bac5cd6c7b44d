"""A sequence classification head on the GPT's final hidden states (fine-tuned fully, with LoRA, or head only).

The hidden states are the transformer's own: the GPT's embedding, its blocks and its final norm, run here without
the LM head (transformer.py is not touched). Batches are right-padded with a mask; since attention is causal, the
valid tokens never see the padding, and the pooling reads valid positions only: "last" takes the hidden state of
each row's last valid token (what a causal model has read everything by), "mean" averages its valid tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from model.field_checks import check_choice, check_int
from model.transformer import GPT

__all__ = ["POOLINGS", "SequenceClassifier", "final_hidden_states", "pad_batch"]

POOLINGS = ("last", "mean")


def final_hidden_states(gpt: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The GPT's hidden states after its final norm, idx (B, T) -> (B, T, C): `GPT.forward` up to the LM head."""
    T = idx.shape[1]
    assert T <= gpt.config.block_size, f"sequence length {T} exceeds block_size {gpt.config.block_size}"
    positions = torch.arange(T, device=idx.device)[None]  # (1, T)
    x = gpt._embed(idx, positions)  # (B, T, C)
    rope = gpt._rope(positions, x.dtype)
    for block in gpt.blocks:
        x = block(x, rope)
    return gpt.norm_f(x)


def pad_batch(seqs: Sequence[Sequence[int]], max_len: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (and cut to their first max_len tokens) id lists: ids (B, T) long and mask (B, T) bool, T the
    longest kept length. Every sequence must hold at least one token."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence must hold at least 1 token")
    T = min(max_len, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for row, s in enumerate(seqs):
        kept = list(s[:T])
        ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        mask[row, : len(kept)] = True
    return ids, mask


class SequenceClassifier(nn.Module):
    """`gpt` (its weights shared, not copied) + pooling + a linear head to `n_classes` logits."""

    def __init__(self, gpt: GPT, n_classes: int, pooling: str = "last", dropout: float = 0.0) -> None:
        super().__init__()
        check_int("n_classes", n_classes, 2)
        check_choice("pooling", pooling, POOLINGS)
        self.gpt = gpt
        self.n_classes = n_classes
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(gpt.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C), mask (B, T) (bool or 0/1) -> (B, C) over each row's valid tokens."""
        mask = mask.to(hidden.dtype)  # (B, T)
        if self.pooling == "mean":
            return (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,) index of each row's last valid token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) long, right-padded; mask (B, T) True/1 on valid tokens (None: all valid).
        Returns logits (B, n_classes)."""
        if mask is None:
            mask = torch.ones_like(idx, dtype=torch.bool)
        pooled = self.pool(final_hidden_states(self.gpt, idx), mask)  # (B, C)
        return self.head(self.dropout(pooled))
