"""The torch modules the exporters trace: the model's own `forward_cached`, fed a cache that suits each format.

`GPT.forward_cached` reads and writes its KV cache only through `cache.write(layer, slots, pos, k, v)` and
`cache.read(layer, slots, kv_len)` (and checks its arguments against `cache.n_slots`, `cache.max_len` when
not compiling). Each exporter passes an object with those two methods, so every format
runs the exact code the serving engine runs (no second copy of the transformer to drift):
- `ExplicitKVDecoder` (ONNX): past K/V are inputs; `write` concatenates the new K/V onto them, and the
  concatenations are the `present_*` outputs (Optimum's past_key_values layout).
- `FixedKVDecoder` (ONNX, fixed-size cache): the past is a host-owned buffer per layer (B, Hkv, capacity, D) with
  each row's length; attention reads it in place (the cache's `past_buffers`) and the outputs are only the new
  K/V, which the host writes into its buffers: no per-step copy of the whole cache.
- `StatefulKVDecoder` (CoreML, iOS18 `ct.StateType`): the cache is two registered buffers updated in place
  with slice writes, which coremltools turns into `read_state` / `slice_update` / `write_state`.
- `StatelessDecoder` (CoreML): no cache; the whole context is recomputed per call.
The CoreML caches hand K/V back already repeated to n_head heads (expand + reshape), because coremltools
cannot convert `repeat_interleave` with a dynamic sequence length; `attention` then sees plain MHA.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.transformer import GPT

__all__ = ["ExplicitKVDecoder", "FixedKVDecoder", "StatefulKVDecoder", "StatelessDecoder"]


def _heads_first(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*T, Hkv, D) as `forward_cached` writes new K/V -> (B, Hkv, T, D)."""
    n, h, d = x.shape
    return x.reshape(batch, n // batch, h, d).transpose(1, 2)


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * group, S, D), each K/V head repeated for its group of query heads."""
    if group == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)


class _ConcatCache:
    """A cache whose new K/V are concatenated onto given past K/V (the ONNX past -> present contract)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], batch: int, max_len: int) -> None:
        self.past = past
        self.batch = batch
        self.n_slots, self.max_len = batch, max_len
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(past)  # type: ignore[list-item]

    def write(
        self, layer: int, slot_idx: torch.Tensor, pos_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        past_k, past_v = self.past[layer]  # (B, Hkv, P, D)
        k_new = _heads_first(k, self.batch).to(past_k.dtype)  # (B, Hkv, T, D)
        v_new = _heads_first(v, self.batch).to(past_v.dtype)
        self.present[layer] = (torch.cat((past_k, k_new), dim=2), torch.cat((past_v, v_new), dim=2))

    def read(self, layer: int, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.present[layer]  # (B, Hkv, P + T, D)


class ExplicitKVDecoder(nn.Module):
    """forward(input_ids (B, T), past [(k, v) per layer, each (B, Hkv, P, D)]) -> (logits (B, T, V), present).

    Positions are P + arange(T) for every row; P = 0 is the prefill.
    """

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        batch, seq = input_ids.shape
        past_len = past[0][0].shape[2]
        cache = _ConcatCache(past, batch, past_len + seq)
        slots = torch.arange(batch, device=input_ids.device)  # unused by this cache, but part of the call
        positions = torch.zeros(batch, dtype=torch.long, device=input_ids.device) + past_len  # (B,)
        logits = self.model.forward_cached(input_ids, cache, slots, positions, kv_len=past_len + seq)  # type: ignore[arg-type]
        return logits, cache.present


class _BufferCache:
    """Past K/V in fixed buffers read in place (`past_buffers`); `write` keeps the new K/V as the graph's outputs."""

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], past_lengths: torch.Tensor) -> None:
        self.buffers, self.past_lengths = buffers, past_lengths
        self.n_slots, self.max_len = past_lengths.shape[0], buffers[0][0].shape[2]
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(buffers)  # type: ignore[list-item]

    def write(
        self, layer: int, slot_idx: torch.Tensor, pos_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        self.new[layer] = (_heads_first(k, self.n_slots), _heads_first(v, self.n_slots))  # (B, Hkv, T, D)

    def past_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*self.buffers[layer], self.past_lengths)


class FixedKVDecoder(nn.Module):
    """forward(input_ids (B, T), past_lengths (B,), cache [(k, v) per layer, each (B, Hkv, capacity, D)])
    -> (logits (B, T, V), new [(k, v) per layer, each (B, Hkv, T, D)]).

    Row b's tokens take positions past_lengths[b] + t and attend to its buffer's first past_lengths[b] entries;
    the caller writes the new K/V into its buffers at [past_lengths[b], past_lengths[b] + T).
    """

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, past_lengths: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        buffers = _BufferCache(cache, past_lengths)
        slots = torch.arange(input_ids.shape[0], device=input_ids.device)  # unused by this cache
        logits = self.model.forward_cached(input_ids, buffers, slots, past_lengths)  # type: ignore[arg-type]
        return logits, buffers.new


class _StateCache:
    """Slice writes into preallocated (n_layer, 1, Hkv, max_len, D) buffers at [begin, end)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, begin: int, end: int, group: int) -> None:
        self.keys, self.values = keys, values
        self.begin, self.end, self.group = begin, end, group
        self.n_slots, self.max_len = 1, keys.shape[3]

    def write(
        self, layer: int, slot_idx: torch.Tensor, pos_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        self.keys[layer, :, :, self.begin : self.end] = _heads_first(k, 1).to(self.keys.dtype)
        self.values[layer, :, :, self.begin : self.end] = _heads_first(v, 1).to(self.values.dtype)

    def read(self, layer: int, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys[layer, :, :, : self.end]  # (1, Hkv, end, D)
        values = self.values[layer, :, :, : self.end]
        return _repeat_heads(keys, self.group), _repeat_heads(values, self.group)


class StatefulKVDecoder(nn.Module):
    """forward(input_ids (1, T), causal_mask (1, 1, T, P + T)) -> logits (1, T, V), with the KV cache as state.

    `causal_mask` carries the current length in its shape (Apple's stateful-LLM recipe): the new tokens
    take positions P .. P+T-1 and are written there. Its values are not read (the model builds its own mask).
    """

    def __init__(self, model: GPT, max_len: int) -> None:
        super().__init__()
        self.model = model
        c = model.config
        shape = (c.n_layer, 1, c.n_kv_head, max_len, c.head_dim)
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))
        self.group = c.n_head // c.n_kv_head

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        end = causal_mask.shape[-1]
        begin = end - seq
        cache = _StateCache(self.key_cache, self.value_cache, begin, end, self.group)
        zero = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        return self.model.forward_cached(input_ids, cache, zero, zero + begin, kv_len=end)  # type: ignore[arg-type]


class _LocalCache:
    """No past: `read` returns what `write` was just given (a full-context forward through forward_cached)."""

    def __init__(self, group: int, seq: int) -> None:
        self.group = group
        self.n_slots, self.max_len = 1, seq
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(
        self, layer: int, slot_idx: torch.Tensor, pos_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        self.kv = (_heads_first(k, 1), _heads_first(v, 1))

    def read(self, layer: int, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.kv is not None
        return _repeat_heads(self.kv[0], self.group), _repeat_heads(self.kv[1], self.group)


class StatelessDecoder(nn.Module):
    """forward(input_ids (1, T)) -> logits (1, T, V): the whole context each call, no cache."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model
        self.group = model.config.n_head // model.config.n_kv_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        zero = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        cache = _LocalCache(self.group, seq)
        return self.model.forward_cached(input_ids, cache, zero, zero, kv_len=seq)  # type: ignore[arg-type]
