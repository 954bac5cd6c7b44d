"""A preallocated key/value cache addressed by slot, for incremental decoding and continuous batching.

One slot holds one sequence's keys and values for every layer. A decode step passes, per row, the slot
it uses and the position its new tokens start at, so rows at different lengths advance together; the
serving engine hands slots out and takes them back (it tracks each slot's length, the cache does not).
The buffers are plain tensors, allocated once, so a decode step is shape-stable (CUDA-graph friendly).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.field_checks import check_int

__all__ = ["KVCache"]


class KVCache(nn.Module):
    """Buffers `k`, `v` of shape (n_slots, n_layer, n_kv_head, max_len, head_dim).

    Not part of the model's state dict (non-persistent buffers), so it never reaches a checkpoint.
    `max_len` defaults to, and may not exceed, `config.block_size`.
    """

    def __init__(
        self,
        n_slots: int,
        config: ModelConfig,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        max_len = config.block_size if max_len is None else max_len
        check_int("n_slots", n_slots, 1)
        check_int("max_len", max_len, 1, config.block_size, note=" (block_size)")
        self.n_slots = n_slots
        self.n_layer = config.n_layer
        self.max_len = max_len
        shape = (n_slots, config.n_layer, config.n_kv_head, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self, slots: torch.Tensor | list[int] | None = None) -> None:
        """Zero the given slots (all when None). Not needed for correctness, since attention never reads
        past a row's position, but it keeps a freed slot from leaking a previous request's state."""
        if slots is None:
            self.k.zero_()
            self.v.zero_()
            return
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.k.device)
        self.k[idx] = 0
        self.v[idx] = 0

    def write(
        self, layer: int, slot_idx: torch.Tensor, pos_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store new keys/values of one layer. slot_idx, pos_idx (N,) long; k, v (N, n_kv_head, head_dim)."""
        k_layer = self.k[:, layer]  # (n_slots, Hkv, max_len, D), a view
        v_layer = self.v[:, layer]
        k_layer[slot_idx, :, pos_idx] = k.to(self.k.dtype)
        v_layer[slot_idx, :, pos_idx] = v.to(self.v.dtype)

    def write_layers(self, slot_idx: torch.Tensor, pos_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new key/value per row for every layer at once. slot_idx, pos_idx (N,) long; k, v (N, n_layer,
        n_kv_head, head_dim)."""
        self.k[slot_idx, :, :, pos_idx] = k.to(self.k.dtype)
        self.v[slot_idx, :, :, pos_idx] = v.to(self.v.dtype)

    def read(self, layer: int, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer for the given slots: two (B, n_kv_head, kv_len, head_dim) tensors.
        `index_select` on the slot dimension, not advanced indexing: the same copy, 3.6x faster on the CPU
        (1 thread, 11 vs 40 us for one slot of shakespeare-char at kv_len 160)."""
        k, v = self.layer_view(layer, kv_len)
        return k.index_select(0, slots), v.index_select(0, slots)

    def layer_view(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, every slot, positions [0, kv_len): two (n_slots, n_kv_head, kv_len,
        head_dim) views of the buffers (no copy), for attention that reads each row's slot in place."""
        return self.k[:, layer, :, :kv_len], self.v[:, layer, :, :kv_len]
