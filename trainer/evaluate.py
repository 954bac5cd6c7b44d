"""The loss over a whole split, every token scored once: `split_loss(model, tokens, ...)`.

The trainer's `estimate_loss` samples `eval_iters` random batches (nanoGPT's estimate, cheap enough to run every
`eval_interval` steps). A claim about a final model rests on this instead: the split cut into consecutive windows
of the context length (the last one shorter), each token predicted once from the tokens before it in its window.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["split_loss"]


@torch.no_grad()
def split_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    block_size: int,
    device: torch.device,
    *,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Mean cross-entropy (nats per token) of `model` over `tokens` (N,), in windows of `block_size` inputs."""
    n_targets = len(tokens) - 1
    assert n_targets >= 1, f"a split needs at least 2 tokens, got {len(tokens)}"
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    starts = list(range(0, n_targets, block_size))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i in range(0, len(starts), batch_size):
            group = starts[i : i + batch_size]
            lengths = [min(block_size, n_targets - s) for s in group]
            T = max(lengths)
            x = torch.zeros(len(group), T, dtype=torch.long)
            y = torch.full((len(group), T), -1, dtype=torch.long)  # -1: no target (a short last window's padding)
            for row, (s, n) in enumerate(zip(group, lengths)):
                x[row, :n], y[row, :n] = data[s : s + n], data[s + 1 : s + n + 1]
            with autocast:
                logits, _ = model(x.to(device))  # (B, T, V)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="sum"
            )
            total += loss.double()
    finally:
        model.train(was_training)
    return float(total) / n_targets
