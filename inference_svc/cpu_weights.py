"""The weights a CPU `TorchRunner` decodes with: fp32, bf16, or weight-only INT8 (`TorchRunner(cpu_weights=)`).

At batch 1 a CPU decode step reads every weight once (shakespeare-char: 43 MB in fp32 for 10.8M parameters), so
its time follows the weights' bytes. The choices, measured in inference_svc/PERF_NOTES.md section 10:
- "fp32": the model as given (the default);
- "bf16": model, activations and KV cache in bf16 (oneDNN's bf16 matmul on avx512_bf16): half the bytes;
- "int8": every Linear swapped for `CpuInt8Linear` (model.quantize's weight-only INT8 layout, one scale per output
  channel; the LM head gets its own quantized copy, the embedding stays float): a quarter of the bytes. The
  rest of the model (embeddings, norms, attention, KV cache, logits) stays in the runner's dtype.
"""

from __future__ import annotations

import copy
import logging
import types
from typing import Sequence

import torch
import torch.nn as nn

from model.kv_cache import KVCache
from model.layers import split_cache_attention
from model.quantize import Int8Linear
from model.transformer import GPT

__all__ = ["CPU_WEIGHTS", "CompiledDecodeStep", "CpuInt8Linear", "cpu_int8_model"]

log = logging.getLogger(__name__)

CPU_WEIGHTS = ("fp32", "bf16", "int8")
# torch._weight_int8pack_mm's CPU kernel gives wrong sums (or crashes) unless K is a multiple of this (seen on torch
# 2.13: K 8, 24, 40 wrong or a segfault; 16, 32, 48, 64, 96, ..., 1536 right); other layers use the dequantising path.
INT8PACK_K_MULTIPLE = 16


class CpuInt8Linear(Int8Linear):
    """`Int8Linear` (q int8 (N, K), scale (N,)) multiplied by `torch._weight_int8pack_mm`, the fused CPU kernel that
    torchao and gpt-fast use on CPU: it reads the int8 weights as they are. The kernel takes bf16 activations (in
    fp32 it ran 13x slower here), so x is rounded to bf16 on the way in, the sum accumulated in fp32 and rounded to
    bf16, then returned in x's dtype. K not a multiple of INT8PACK_K_MULTIPLE: `Int8Linear`'s dequantising path."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "CpuInt8Linear":
        m = super().from_linear(linear)
        m.register_buffer("scale_bf16", m.scale.to(torch.bfloat16))  # the kernel wants the scales in x's dtype
        return m

    @classmethod
    def concat(cls, parts: Sequence["CpuInt8Linear"]) -> "CpuInt8Linear":
        """One module whose output is the parts' outputs side by side (`Attention.fuse_qkv`: q, k, v in one kernel
        call): their int8 rows and per-channel scales stacked, so each output is exactly the part's own."""
        first = parts[0]
        assert all(p.in_features == first.in_features and (p.bias is None) == (first.bias is None) for p in parts)
        n = sum(p.out_features for p in parts)
        m = cls(first.in_features, n, first.bias is not None, device=first.q.device, dtype=first.scale.dtype)
        m.q, m.scale = torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts])
        m.register_buffer("scale_bf16", torch.cat([p.scale_bf16 for p in parts]))
        if first.bias is not None:
            m.bias = nn.Parameter(torch.cat([p.bias for p in parts]).detach(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_features % INT8PACK_K_MULTIPLE != 0 or x.device.type != "cpu":
            return super().forward(x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K)
        scale = self.scale_bf16.to(torch.bfloat16)  # a no-op unless a module.to(dtype) converted it
        y = torch._weight_int8pack_mm(x2, self.q, scale).to(x.dtype)  # (M, N)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def cpu_int8_model(model: GPT) -> GPT:
    """A copy of `model` (on the CPU) with every `nn.Linear` swapped for a `CpuInt8Linear`; `model` is left as it is."""
    model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, CpuInt8Linear.from_linear(linear))
    slow = [name for name, m in targets if m.in_features % INT8PACK_K_MULTIPLE]
    if slow:
        log.warning("int8 CPU weights: %s have in_features not a multiple of %d: dequantised per call (slow)",
                    slow, INT8PACK_K_MULTIPLE)  # fmt: skip
    return model


# The CPU decode step of one row compiled whole, the KV cache only read inside it (TorchRunner(cpu_compile=)) --------


def _decode_step(model: GPT, qkvs: list, idx: torch.Tensor, pos: torch.Tensor, cache_k: torch.Tensor,
                 cache_v: torch.Tensor, slots: torch.Tensor, kv_len: int, rope):  # fmt: skip
    """One new token per row: idx, pos (B, 1) long; cache_k / cache_v the cache's buffers (n_slots, n_layer, Hkv,
    max_len, D), read, never written; slots (B,). Each layer attends over its row's past keys (positions < pos,
    gathered from the cache) and its new key beside them (`split_cache_attention`), so the cache needs no write
    before the read. Returns logits (B, V) and every layer's new keys and values, (B, n_layer, Hkv, D) each."""
    x = model._embed(idx, pos)  # (B, 1, C)
    ks, vs = [], []
    for layer, block in enumerate(model.blocks):
        q, k, v = block.attn.project(block.norm_1(x), rope, qkvs[layer])  # (B, H, 1, D), (B, Hkv, 1, D) x 2
        k_past = cache_k[:, layer, :, :kv_len].index_select(0, slots).to(q.dtype)  # (B, Hkv, S, D)
        v_past = cache_v[:, layer, :, :kv_len].index_select(0, slots).to(q.dtype)
        y = split_cache_attention(q, k_past, v_past, pos[:, 0], k, v)  # (B, H, 1, D)
        x = x + block.attn.out(y)
        x = x + block.mlp(block.norm_2(x))
        ks.append(k[:, :, 0])
        vs.append(v[:, :, 0])
    return model.lm_head(model.norm_f(x))[:, 0], torch.stack(ks, 1), torch.stack(vs, 1)


class CompiledDecodeStep:
    """`GPT.forward_cached`'s decode step (one new token per row, `last_only`) as one torch.compile graph (Inductor's
    C++ backend), the KV cache an input that the graph only reads: each layer's attention runs over the row's past
    keys and the new key beside them, and the new keys and values of every layer come out of the graph and are
    written after it, one indexed write for keys and one for values (`KVCache.write_layers`). A compiled in-place
    cache write was the whole-step compile's undoing in PERF_NOTES section 10 (c''): the functionalised write copied
    the cache back, 27-106 ms a step. Compiled for `rows` rows (torch.compile specialises the shapes; the runner sends
    other row counts the eager way) on first use, and again once kv_len first changes (then symbolic: one graph for
    every kv_len): `warm` does both up front. Numerics: the same ops fused by Inductor, attention in `split_cache_attention`'s form; the
    tests check greedy tokens equal the eager step's."""

    def __init__(self, model: GPT, rows: int = 1) -> None:
        self.model, self.rows = model, rows
        self.calls = 0  # steps run (tests: the runner took this path)
        # A code object of its own: dynamo keeps compiled graphs per code object (at most 8, then fullgraph=True fails
        # hard), so runners of many differently shaped models in one process (tests, benches) must not share one.
        step = types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__, "_decode_step")
        self._step = torch.compile(step, fullgraph=True)

    def warm(self, cache: KVCache, slot: int) -> None:
        """Compile now rather than in a served request's step (64 s with an empty Inductor cache here, 24 s warm): two steps on `slot`, a slot no
        row reads (its positions 1 and 2 are written), at kv_len 2 and 3 (the second makes kv_len symbolic)."""
        if cache.max_len < 3:
            return
        device = cache.k.device
        idx = torch.zeros(self.rows, 1, dtype=torch.long, device=device)
        slots = torch.full((self.rows,), slot, dtype=torch.long, device=device)
        with torch.inference_mode():
            for p in (1, 2):
                self(idx, cache, slots, torch.full((self.rows,), p, dtype=torch.long, device=device), p + 1)
        self.calls = 0

    def __call__(
        self, idx: torch.Tensor, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """idx (B, 1) long, slots and positions (B,) long, every position < kv_len -> logits (B, V), as
        `forward_cached(idx, cache, slots, positions, kv_len=kv_len, last_only=True)`, the new K/V written."""
        model = self.model
        self.calls += 1
        pos = positions[:, None]  # (B, 1)
        rope = model._rope(pos, model.tok_emb.weight.dtype)
        qkvs = [block.attn._fused_qkv() for block in model.blocks]
        logits, ks, vs = self._step(model, qkvs, idx, pos, cache.k, cache.v, slots, kv_len, rope)
        cache.write_layers(slots, positions, ks, vs)
        return logits
