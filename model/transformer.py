"""A decoder-only transformer: GPT-2 (nanoGPT) and Llama flavours from one `ModelConfig`.

Token embedding (+ learned positions) -> n_layer pre-norm blocks (attention, MLP) -> final norm -> LM head.
`forward` runs a full sequence (training, evaluation); `forward_cached` runs new tokens against a
`KVCache` (prefill and decode, many sequences at different positions in one batch).
Parameter names follow HF Llama's inside a block (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj), which LoRA targets and the exporters rely on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import decode_gemv
from kernels.decode_attention_step import MAX_SINGLE_PASS_KEYS, decode_attention_step
from kernels.decode_gemv import Embedding, NormParams, linear_residual, norm_linear
from kernels.dispatch import option_impl
from model.layers import decode_attention  # the kernel where KERNEL_DEFAULTS turns it on
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.layers import (
    LayerNorm,
    RMSNorm,
    add_norm,
    apply_rope,
    attention,
    gelu,
    kernels_apply,
    rope_cos_sin,
    split_cache_attention,
    swiglu,
)

__all__ = ["GPT", "Block", "Attention", "MLP"]


@dataclass
class _CacheStep:
    """What every layer needs to read and write the KV cache during one `forward_cached` call."""

    cache: KVCache
    slots: torch.Tensor  # (B,) slot of each row
    write_slots: torch.Tensor  # (N,) slot of each valid new token (N = B*T, or fewer with padding)
    write_pos: torch.Tensor  # (N,) its position
    write_sel: torch.Tensor | None  # (B*T,) bool: which new tokens are valid; None = all
    kv_len: int  # attend over cache positions [0, kv_len)
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool: key position <= query position (None when in place)
    in_place_lengths: torch.Tensor | None = None  # (B,) keys per row: decode attention over the cache in place


Rope = tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (B or 1, 1, T, head_dim), or None without RoPE


def _norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return LayerNorm(config.n_embd, config.norm_eps, bias=config.bias)


class Attention(nn.Module):
    """Multi-head attention with n_kv_head key/value heads (MHA, GQA or MQA) and optional RoPE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_eps = config.norm_eps if config.qk_norm else None  # None: no QK-norm

    def fuse_qkv(self) -> bool:
        """Keep q/k/v's weights (and biases) concatenated, so the cached path projects with one matmul instead of
        three (a serving engine's decode step). A copy, not part of the state dict: call it again after the weights
        change. False (nothing kept) when a projection is not a plain Linear (e.g. LoRA-wrapped), unless all three
        are of one kind that joins itself (a `concat` classmethod: the CPU runner's INT8 `CpuInt8Linear`): then one
        such module is kept, likewise outside the state dict.
        A copy still fresh is kept, not made again: a CUDA graph captured over it reads it by address, so a second
        runner over the same model (the speculative bench builds one per k) must not free it under the first."""
        if self._fused_qkv() is not None:
            return True
        projs = (self.q_proj, self.k_proj, self.v_proj)
        concat = getattr(type(self.q_proj), "concat", None)
        if concat is not None and all(type(p) is type(self.q_proj) for p in projs):
            with torch.no_grad():
                object.__setattr__(self, "qkv", concat(projs))  # not registered: a derived copy, like the tuple
        elif not all(type(p) is nn.Linear for p in projs):
            self.qkv = None
            return False
        else:
            with torch.no_grad():
                weight = torch.cat([p.weight for p in projs])
                bias = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
            self.qkv = (weight, bias)
        self._qkv_of = self._qkv_sources()
        return True

    def _qkv_sources(self) -> tuple:
        """What the concatenated copy was made from: each projection parameter, its version counter (bumped by
        every in-place change), dtype and device (`module.to` swaps the data but keeps the version; not data_ptr,
        which torch.export cannot trace), so a copy made stale by training, a LoRA merge or a move is never used."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        tensors = [t for proj in projs for t in (*proj.parameters(), *proj.buffers())]  # a quantized one's buffers too
        return tuple((p, (p._version, p.dtype, p.device)) for p in tensors)

    def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | nn.Module | None:
        qkv = getattr(self, "qkv", None)
        if qkv is None:
            return None
        now = self._qkv_sources()
        fresh = len(now) == len(self._qkv_of) and all(a is b and u == w for (a, u), (b, w) in zip(now, self._qkv_of))
        return qkv if fresh else None

    def project(
        self, x: torch.Tensor, rope: Rope, qkv: tuple[torch.Tensor, torch.Tensor | None] | nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k, v (B, Hkv, T, D): the projections (one matmul with `qkv`, the fused
        copy `_fused_qkv` returns), QK-norm and RoPE. Pure compute, no cache: the CPU decode step compiles it."""
        B, T, C = x.shape
        if qkv is not None:  # one matmul (fuse_qkv), split into views
            kv_dim = self.n_kv_head * self.head_dim
            qkv_out = qkv(x) if isinstance(qkv, nn.Module) else F.linear(x, *qkv)  # (B, T, C + 2 kv_dim)
            q, k, v = qkv_out.split([C, kv_dim, kv_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_eps is not None:  # QK-norm: every head's q and k at unit RMS, so logits cannot blow up
            q, k = _unit_rms(q, self.qk_eps), _unit_rms(k, self.qk_eps)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def out(self, y: torch.Tensor) -> torch.Tensor:
        """Attention's output y (B, H, T, D) -> the output projection (B, T, C)."""
        B, H, T, D = y.shape
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # (B, T, C)
        return self.resid_dropout(self.o_proj(y))

    def forward(self, x: torch.Tensor, rope: Rope, layer: int = 0, step: _CacheStep | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.project(x, rope, self._fused_qkv() if step is not None else None)
        dropout_p = self.dropout if self.training else 0.0
        if step is None:
            y = attention(q, k, v, causal=True, dropout_p=dropout_p)  # (B, H, T, D)
        else:
            k_new = k.transpose(1, 2).reshape(B * T, self.n_kv_head, self.head_dim)  # (B*T, Hkv, D)
            v_new = v.transpose(1, 2).reshape(B * T, self.n_kv_head, self.head_dim)
            if step.write_sel is not None:
                k_new, v_new = k_new[step.write_sel], v_new[step.write_sel]  # (N, Hkv, D)
            step.cache.write(layer, step.write_slots, step.write_pos, k_new, v_new)
            past_buffers = getattr(step.cache, "past_buffers", None)
            if step.in_place_lengths is not None:  # one query per row: read each row's slot where it lies
                k_layer, v_layer = step.cache.layer_view(layer, step.kv_len)  # (n_slots, Hkv, S, D) views
                y = decode_attention(q[:, :, 0], k_layer, v_layer, step.slots, step.in_place_lengths)[:, :, None]
            elif past_buffers is not None:  # a fixed past buffer read as it is, the new K/V beside it (ONNX fixed KV)
                k_past, v_past, past_lengths = past_buffers(layer)  # (B, Hkv, S, D) x 2, (B,)
                y = split_cache_attention(q, k_past.to(q.dtype), v_past.to(q.dtype), past_lengths, k, v)
            else:
                k_all, v_all = step.cache.read(layer, step.slots, step.kv_len)  # (B, Hkv, S, D)
                y = attention(q, k_all.to(q.dtype), v_all.to(q.dtype), mask=step.mask, dropout_p=dropout_p)
        return self.out(y)


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, in float32 (plain ops: every exporter traces them)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).type_as(x)


class MLP(nn.Module):
    """SwiGLU (gate_proj, up_proj, down_proj), GELU or ReLU² (up_proj, down_proj) feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        self.gated = config.mlp == "swiglu"
        self.relu2 = config.mlp == "relu2"
        if self.gated:
            self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = swiglu(self.gate_proj(x), self.up_proj(x))  # (B, T, hidden)
        elif self.relu2:
            h = F.relu(self.up_proj(x)).square()  # (B, T, hidden)
        else:
            h = gelu(self.up_proj(x))  # (B, T, hidden)
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = _norm(config)
        self.attn = Attention(config)
        self.norm_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        layer: int = 0,
        step: _CacheStep | None = None,
        *,
        normed: torch.Tensor | None = None,
        next_norm: nn.Module | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> the block's output (B, T, C).

        The fused form (GPT.forward with our kernels): given `normed` = norm_1(x), each residual add runs in one
        kernel with the norm after it (norm_2 here, then `next_norm`: the next block's norm_1, or norm_f), and the
        block returns (output, next_norm(output)) for the next block to start from.
        """
        if normed is None:
            x = x + self.attn(self.norm_1(x), rope, layer, step)
            return x + self.mlp(self.norm_2(x))
        assert next_norm is not None, "the fused form needs next_norm, the norm that reads this block's output"
        h, x = add_norm(self.norm_2, self.attn(normed, rope, layer, step), x)  # x += attn; h = norm_2(x)
        h, x = add_norm(next_norm, self.mlp(h), x)  # x += mlp; h = next_norm(x)
        return x, h


class GPT(nn.Module):
    """The language model. `config` is kept as an attribute; weights are initialised as in nanoGPT.

    `gradient_checkpointing` (a run-time switch, not part of the config, so artifacts never record it): when
    True, a training forward keeps only each block's input and recomputes the block's activations in backward
    (less memory, about one more forward of compute).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_dropout(self, p: float) -> None:
        """Set the dropout probability of every dropout in the model (embedding, residual, MLP and attention
        weights) for the following forwards; `config.dropout` keeps the value the model was built with."""
        assert 0.0 <= p < 1.0, f"dropout must be in [0, 1), got {p}"
        self.drop.p = p
        for block in self.blocks:
            block.attn.dropout = block.attn.resid_dropout.p = block.mlp.dropout.p = p

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of (unique) parameters; `non_embedding` leaves out the position embedding, as nanoGPT
        reports (the token embedding counts, since it is also the LM head when tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embedding. idx (B, T); positions (B or 1, T). Returns (B, T, C)."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            # Padding rows may run past the table; their outputs are never used.
            x = x + self.pos_emb(positions.clamp(max=self.config.block_size - 1))
        return self.drop(x)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos, sin of shape (B or 1, 1, T, head_dim) for positions (B or 1, T), or None without RoPE."""
        if self.config.pos != "rope":
            return None
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) long -> logits (B, T, V), and the mean cross-entropy against targets (B, T)
        when given (targets of -1 are ignored)."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence length {T} exceeds block_size {self.config.block_size}"
        positions = torch.arange(T, device=idx.device)[None]  # (1, T)
        x = self._embed(idx, positions)  # (B, T, C)
        rope = self._rope(positions, x.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if kernels_apply(x) and not recompute:
            h = self._fused_blocks(x, rope)
        else:
            for block in self.blocks:
                # Non-reentrant checkpointing restores the RNG state for the recomputation: the same dropout masks.
                x = checkpoint(block, x, rope, use_reentrant=False) if recompute else block(x, rope)
            h = self.norm_f(x)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def forward_cached(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor | None = None,
        *,
        kv_len: int | None = None,
        last_only: bool = False,
        attention_in_place: bool = False,
        pad_slot: int | None = None,
        small_batch_kernels: bool | str = False,
        rows_share_slots: bool = False,
    ) -> torch.Tensor:
        """Run new tokens against the KV cache and return their logits.

        idx (B, T) long: new tokens, right-padded when rows have different counts.
        slots (B,) long: the cache slot of each row. positions (B,) long: where each row's new tokens
        start (its current length). lengths (B,) long or None: valid new tokens per row (None: all T).
        K/V are written at [slot, layer, :, pos:pos+len]; row b's token t attends to cache positions
        0..positions[b]+t. `kv_len` (optional, >= max(positions + lengths)) bounds the attention span
        below `cache.max_len`. Returns logits (B, T, V), or (B, V) at each row's last valid token when
        `last_only`. Logits at padded positions are meaningless.

        `attention_in_place` (one new token per row, T == 1): attention reads each row's slot in the cache where
        it lies (`kernels.decode_attention`: Triton on CUDA) instead of gathering the rows' keys and values for SDPA.

        `small_batch_kernels` (with `attention_in_place`, B <= `kernels.decode_gemv.MAX_ROWS`, kv_len <=
        `MAX_SINGLE_PASS_KEYS`, in eval mode, plain nn.Linear layers with `fuse_qkv` done): the step runs as about
        five launches per layer (`_small_batch_step`) and returns float32 logits; otherwise this option changes
        nothing. True (or "auto") takes it on CUDA only; "triton" forces the Triton kernels (the interpreter on
        CPU), "reference" their PyTorch references (tests). `rows_share_slots` (with it): rows may share a slot at
        consecutive positions (a speculative verify's k + 1 rows of a sequence): every row's K/V is written before any
        row attends (one launch more per layer).

        A cache with `past_buffers(layer)` -> (k, v (B, Hkv, S, D), past lengths (B,)) keeps each row's past in a
        buffer of its own that this call only reads (row b at [b]): attention runs over it and the new tokens'
        K/V side by side (`split_cache_attention`), which `cache.write` receives and stores wherever it likes.

        Argument checks cost one host sync; they are skipped under torch.compile and CUDA-graph capture.
        `lengths` selects the tokens to write with a boolean mask (data-dependent shapes, a host sync): leave it None
        for a decode step that is to be captured in a CUDA graph, or give `pad_slot`, a cache slot no row reads: then
        every token is written, the padded ones into that slot at their offset (no sync; capturable).
        """
        B, T = idx.shape
        kv_len = cache.max_len if kv_len is None else kv_len
        if not (torch.compiler.is_compiling() or _capturing(idx)):
            _check_cached_args(idx, cache, slots, positions, lengths, kv_len)
        impl = option_impl("small_batch_kernels", small_batch_kernels)
        if attention_in_place and impl is not None and T == 1 and lengths is None:
            if self._small_batch_fits(idx, kv_len, impl):  # before any other op: each is a launch in the graph
                logits = self._small_batch_step(idx[:, 0], cache, slots, positions, impl, rows_share_slots)  # (B, V)
                return logits if last_only else logits[:, None]
        offsets = torch.arange(T, device=idx.device)  # (T,)
        pos = positions[:, None] + offsets  # (B, T) absolute position of each new token
        write_slots = slots[:, None].expand(B, T).reshape(-1)  # (B*T,)
        write_pos = pos.reshape(-1)
        write_sel = None
        if lengths is not None:
            write_sel = (offsets[None, :] < lengths[:, None]).reshape(-1)  # (B*T,)
            if pad_slot is None:
                write_slots, write_pos = write_slots[write_sel], write_pos[write_sel]
            else:  # padded tokens to pad_slot at their offset (< T <= max_len: never past the cache)
                write_slots = torch.where(write_sel, write_slots, pad_slot)
                write_pos = torch.where(write_sel, write_pos, offsets.repeat(B))
                write_sel = None
        if attention_in_place:
            assert T == 1 and lengths is None, "attention_in_place decodes one new token per row"
            step = _CacheStep(cache, slots, write_slots, write_pos, None, kv_len, None, positions + 1)
        else:
            key_pos = torch.arange(kv_len, device=idx.device)  # (S,)
            mask = (key_pos[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # (B, 1, T, S)
            step = _CacheStep(cache, slots, write_slots, write_pos, write_sel, kv_len, mask)

        x = self._embed(idx, pos)  # (B, T, C)
        rope = self._rope(pos, x.dtype)
        if kernels_apply(x):
            h = self._fused_blocks(x, rope, step)  # (B, T, C), after norm_f
        else:
            for layer, block in enumerate(self.blocks):
                x = block(x, rope, layer, step)
            h = None
        if last_only:
            last = (lengths - 1) if lengths is not None else torch.full_like(positions, T - 1)
            rows = torch.arange(B, device=idx.device)
            h = self.norm_f(x[rows, last]) if h is None else h[rows, last]  # (B, C)
            return self.lm_head(h)  # (B, V)
        return self.lm_head(self.norm_f(x) if h is None else h)  # (B, T, V)

    def fuse_qkv(self) -> None:
        """Each attention's q/k/v weights kept concatenated for `forward_cached` (one projection matmul per layer
        instead of three: `Attention.fuse_qkv`). For serving: call it after the model's last move or change."""
        for block in self.blocks:
            block.attn.fuse_qkv()

    def _small_batch_fits(self, idx: torch.Tensor, kv_len: int, impl: str) -> bool:
        """Whether `_small_batch_step` serves this decode step (else forward_cached takes its usual path)."""
        B = idx.shape[0]
        if self.training or torch.compiler.is_compiling() or (impl == "auto" and not idx.is_cuda):
            return False
        if B > decode_gemv.MAX_ROWS or kv_len > MAX_SINGLE_PASS_KEYS:
            return False
        linears = [self.lm_head] + [
            m for block in self.blocks for m in (block.attn.o_proj, block.mlp.up_proj, block.mlp.down_proj)
        ]
        linears += [block.mlp.gate_proj for block in self.blocks if block.mlp.gated]
        return all(type(m) is nn.Linear for m in linears) and all(
            isinstance(b.attn._fused_qkv(), tuple) for b in self.blocks
        )

    def _small_batch_step(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        positions: torch.Tensor,
        impl: str,
        rows_share_slots: bool = False,
    ) -> torch.Tensor:
        """One decode step (tokens, slots, positions (B,)) in 5 launches per layer + 1: qkv GEMV with the norm
        prologue (layer 0's also computes the embedding), the attention step (QK-norm, RoPE, cache write, attention),
        out-projection GEMV + residual, MLP up GEMV with the norm prologue and the activation, down GEMV + residual;
        then norm_f + lm_head in one GEMV. Returns float32 logits (B, V)."""
        c = self.config
        pos_weight = self.pos_emb.weight if self.pos_emb is not None else None
        embedding = Embedding(tokens, positions, self.tok_emb.weight, pos_weight)
        rope_theta = c.rope_theta if c.pos == "rope" else None
        x = None  # (B, C) the residual stream
        for layer, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            w_qkv, b_qkv = attn._fused_qkv()
            if x is None:
                qkv, x = norm_linear(None, _norm_params(block.norm_1), w_qkv, b_qkv, embedding=embedding, impl=impl)
            else:
                qkv = norm_linear(x, _norm_params(block.norm_1), w_qkv, b_qkv, impl=impl)  # (B, (H + 2 Hkv) D)
            y = decode_attention_step(
                qkv,
                cache.k,
                cache.v,
                layer,
                slots,
                positions,
                attn.n_head,
                rope_theta=rope_theta,
                qk_norm_eps=attn.qk_eps,
                write_first=rows_share_slots,
                impl=impl,
            )  # (B, C)
            x = linear_residual(y, attn.o_proj.weight, attn.o_proj.bias, x, impl=impl)
            gate = dict(gate_weight=mlp.gate_proj.weight, gate_bias=mlp.gate_proj.bias) if mlp.gated else {}
            up = mlp.up_proj
            h = norm_linear(x, _norm_params(block.norm_2), up.weight, up.bias, activation=c.mlp, **gate, impl=impl)
            x = linear_residual(h, mlp.down_proj.weight, mlp.down_proj.bias, x, impl=impl)
        head = self.lm_head
        return norm_linear(x, _norm_params(self.norm_f), head.weight, head.bias, out_dtype=torch.float32, impl=impl)

    def _fused_blocks(self, x: torch.Tensor, rope: Rope, step: _CacheStep | None = None) -> torch.Tensor:
        """The blocks with every residual add run in one kernel with the norm that reads its sum (block i's MLP
        output is added and normed by block i+1's norm_1, the last by norm_f). Returns norm_f(output) (B, T, C).
        Checkpointing keeps the plain form: there a block's boundary must be its plain output."""
        h = self.blocks[0].norm_1(x) if len(self.blocks) else self.norm_f(x)  # (B, T, C)
        next_norms = [block.norm_1 for block in self.blocks[1:]] + [self.norm_f]
        for layer, (block, next_norm) in enumerate(zip(self.blocks, next_norms)):
            x, h = block(x, rope, layer, step, normed=h, next_norm=next_norm)
        return h


def _norm_params(norm: nn.Module) -> NormParams:
    """An `RMSNorm` or `LayerNorm` module as the GEMV prologue's norm."""
    if isinstance(norm, RMSNorm):
        return NormParams("rmsnorm", norm.weight, None, norm.eps)
    return NormParams("layernorm", norm.weight, norm.bias, norm.eps)


def _capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured (host-side checks would sync and break capture)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_cached_args(
    idx: torch.Tensor,
    cache: KVCache,
    slots: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor | None,
    kv_len: int,
) -> None:
    """Fail fast on shapes and ranges (skipped under torch.compile and CUDA-graph capture)."""
    B, T = idx.shape
    assert idx.dtype == torch.long, f"idx must be int64, got {idx.dtype}"
    assert slots.shape == (B,) and positions.shape == (B,), (
        f"slots and positions must have shape ({B},), got {tuple(slots.shape)} and {tuple(positions.shape)}"
    )
    assert 1 <= kv_len <= cache.max_len, f"kv_len must be in [1, {cache.max_len}], got {kv_len}"
    counts = torch.full_like(positions, T) if lengths is None else lengths
    assert counts.shape == (B,), f"lengths must have shape ({B},), got {tuple(counts.shape)}"
    if B == 0:
        return
    # One host sync for all range checks.
    s_min, s_max, p_min, c_min, c_max, end = torch.stack(
        [slots.min(), slots.max(), positions.min(), counts.min(), counts.max(), (positions + counts).max()]
    ).tolist()
    assert s_min >= 0 and s_max < cache.n_slots, f"slots must be in [0, {cache.n_slots}), got [{s_min}, {s_max}]"
    assert p_min >= 0, f"positions must be >= 0, got {p_min}"
    assert c_min >= 1 and c_max <= T, f"lengths must be in [1, {T}], got [{c_min}, {c_max}]"
    assert end <= kv_len, f"positions + lengths reach {end}, beyond kv_len={kv_len} (cache max_len {cache.max_len})"
