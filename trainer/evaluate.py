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
    starts = torch.arange(0, n_targets, block_size)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i in range(0, len(starts), batch_size):
            group = starts[i : i + batch_size]
            T = min(block_size, n_targets - int(group[0]))  # the group's longest window: only the split's last is short
            pos = group[:, None] + torch.arange(T)  # (g, T) input positions
            inside = pos < n_targets  # outside: a short last window's padding, input 0 and no target (-1)
            x = torch.where(inside, data[pos.clamp(max=n_targets - 1)], 0)
            y = torch.where(inside, data[(pos + 1).clamp(max=n_targets)], -1)
            with autocast:
                logits, _ = model(x.to(device))  # (B, T, V)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="sum"
            )
            total += loss.double()
    finally:
        model.train(was_training)
    return float(total) / n_targets
