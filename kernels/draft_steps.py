"""A speculative round's draft in ONE launch: the draft model's k + 1 one-token cached forwards per row, in one Triton
program per row (a small "megakernel"), picking each draft token in the kernel.

Why: the `tiny` draft (4 layers x 128) is launch-bound on the GPU (~24 launches a step, ~2.5 us each): a round at k = 4
spent ~0.3 ms in its k + 1 draft steps, more than half a target step each (inference_svc/PERF_NOTES.md 6c). One launch
for all of them removes ~120 launches a round (more when sampling); `tiny`'s weights (0.80M parameters at vocab 65,
1.6 MB in bf16) stay in L2 across the steps.

Per row (program), with x = x_0, d_1 .. d_k fed at positions pos .. pos + k of the row's slot:
    embedding -> per layer: RMSNorm, k/v of every KV head (rotate-half RoPE, the two halves of a head computed apart:
    no weight row read twice) stored into the cache, a barrier, then per KV head its query heads' q together (as many
    as `_heads_at_a_time` allows; `tiny`: both) and their attention over the slot's cached keys 0..pos + j, the new
    one included, each key block read once for the group (online softmax), the out-projection summed into the
    residual; RMSNorm, SwiGLU MLP summed chunk by chunk into the residual -> final RMSNorm -> logits (a per-row scratch
    row, a barrier) -> d_(j+1): greedy rows the argmax, sampled rows an inverse-CDF draw with uniforms[:, j] from
    q = softmax(logits / temperature), which is written out.
The (k + 1)-th forward (d_k) only leaves its keys and values in the cache (its last layer stops after the cache
write; no logits). Every matvec is read in chunks
of output rows (a (rows, n_embd) tile at most `TILE_ELEMS` values) with float32 accumulation; the out-projection
and the MLP's down projection are packed transposed, so their chunks are added into the residual with no scratch.

q need not be the distribution the request samples from: the acceptance rule (Leviathan et al. 2023) keeps the
target's distribution for ANY q the drafts were drawn from, so the draft ignores top-k, top-p and the repetition
penalty (temperature only: near the target's q, hence a good acceptance rate; `blocked` ids are never drawn).

Only Llama-style models: RMSNorm, RoPE, SwiGLU, no biases, no QK-norm, plain nn.Linear layers (`DraftModel` refuses
others, naming what is unsupported). Limits (one program holds a row): n_embd and head_dim powers of two, n_embd <=
`MAX_EMBD`, head_dim <= `MAX_HEAD_DIM`, vocab <= `MAX_VOCAB` (padded to a power of two with masks), any MLP hidden width
(masked chunks) and any attention span (the key loop runs to each row's position). Past `tiny`'s size it still
computes, but spills registers (n_embd 1024, vocab 4096: ~5.4 KB of stack in the sm_90 build).

    DraftModel              the packed weights (one copy per model, made once by the runner) and the model itself
    draft_steps             wrapper; impl="auto": the kernel for CUDA tensors, the reference otherwise
    draft_steps_triton      the kernel
    draft_steps_reference   PyTorch: `model.forward_cached` step by step, the same picks
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import triton
import triton.language as tl

from kernels.dispatch import Impl, use_triton

__all__ = [
    "DraftCall",
    "DraftModel",
    "draft_steps",
    "draft_steps_reference",
    "draft_steps_triton",
    "inverse_cdf",
    "MAX_EMBD",
    "MAX_VOCAB",
]

MAX_EMBD = 1024  # a (rows, n_embd) weight tile of TILE_ELEMS holds at least 4 rows
MAX_HEAD_DIM = 128
MAX_VOCAB = 8192  # the logits of a row sit in one register tile for the argmax / softmax / CDF
TILE_ELEMS = 4096  # values per weight tile: 32 a thread at 4 warps (2,048 built the same registers)
BLOCK_N = 32  # keys per attention block
# sm_90 builds of the `tiny` draft (2026-11-30): 4 warps 245 registers, 32 B stack; 8 warps: greedy capped at 128
# registers with 200 B spilled. Untimed: 8 (more loads in flight for one row's SM) is the first alternative to time.
NUM_WARPS = 4
_LOG2E = 1.4426950408889634


class DraftModel:
    """A Llama-style GPT's weights packed for `draft_steps` (stacked per layer, the out- and down-projections
    transposed), in the model's dtype on its device, plus the model itself (the reference path runs it). A copy made
    once: build a new one after the weights change, move or are cast."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        c = model.config
        _check_supported(model)
        self.n_layer, self.n_head, self.n_kv_head, self.head_dim = c.n_layer, c.n_head, c.n_kv_head, c.head_dim
        self.n_embd, self.hidden, self.vocab_size = c.n_embd, c.hidden_dim, c.vocab_size
        self.eps = float(model.blocks[0].norm_1.eps)
        blocks = model.blocks
        with torch.no_grad():
            stack = lambda f: torch.stack([f(b) for b in blocks]).contiguous()  # noqa: E731
            self.norm_1 = stack(lambda b: b.norm_1.weight)  # (L, C)
            self.norm_2 = stack(lambda b: b.norm_2.weight)
            self.wq = stack(lambda b: b.attn.q_proj.weight)  # (L, H D, C)
            self.wk = stack(lambda b: b.attn.k_proj.weight)  # (L, Hkv D, C)
            self.wv = stack(lambda b: b.attn.v_proj.weight)
            self.wo_t = stack(lambda b: b.attn.o_proj.weight.t())  # (L, H D, C): row i is input column i
            self.w_gate = stack(lambda b: b.mlp.gate_proj.weight)  # (L, hidden, C)
            self.w_up = stack(lambda b: b.mlp.up_proj.weight)
            self.w_down_t = stack(lambda b: b.mlp.down_proj.weight.t())  # (L, hidden, C)
            self.norm_f = model.norm_f.weight.detach().contiguous()  # (C,)
            self.emb = model.tok_emb.weight.detach().contiguous()  # (V, C)
            self.head = model.lm_head.weight.detach().contiguous()  # (V, C): the embedding itself when tied
            # RoPE frequencies per dimension as model.layers.rope_cos_sin computes them (i pairs with i + D/2)
            d = c.head_dim
            inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, device=self.emb.device, dtype=torch.float32) / d))
            self.rope_freq = torch.cat((inv, inv)).contiguous()  # (D,) float32
        self.dtype, self.device = self.emb.dtype, self.emb.device


def _check_supported(model: nn.Module) -> None:
    """Refuse, naming the reason, a model the kernel does not compute (not Llama-style, or too big for a program)."""
    c = model.config
    wrong = []
    if c.bias:
        wrong.append("bias=True (biases)")
    if c.norm != "rmsnorm":
        wrong.append(f"norm={c.norm!r} (only 'rmsnorm')")
    if c.pos != "rope":
        wrong.append(f"pos={c.pos!r} (only 'rope')")
    if c.mlp != "swiglu":
        wrong.append(f"mlp={c.mlp!r} (only 'swiglu')")
    if c.qk_norm:
        wrong.append("qk_norm=True")
    if wrong:
        raise ValueError(f"draft_steps runs Llama-style models only; this model has {', '.join(wrong)}")
    linears = [model.lm_head] + [
        m
        for b in model.blocks
        for m in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj)
    ]
    linears += [b.mlp.down_proj for b in model.blocks]
    odd = sorted({type(m).__name__ for m in linears if type(m) is not nn.Linear})
    if odd:
        raise ValueError(f"draft_steps needs plain nn.Linear layers (no LoRA, no quantized layers), got {odd}")
    d, n = c.head_dim, c.n_embd
    if n & (n - 1) or n > MAX_EMBD:
        raise ValueError(f"draft_steps needs n_embd a power of two <= {MAX_EMBD}, got {n}")
    if d & (d - 1) or d > MAX_HEAD_DIM:
        raise ValueError(f"draft_steps needs head_dim a power of two <= {MAX_HEAD_DIM}, got {d}")
    if c.vocab_size > MAX_VOCAB:
        raise ValueError(
            f"draft_steps needs vocab_size <= {MAX_VOCAB} (a row's logits in one tile), got {c.vocab_size}"
        )


@triton.jit
def _matvec_rows(w_ptr, rows, offs_c, x, C: tl.constexpr):
    """sum_c W[rows, c] x[c] for rows (R,) of a row-major (*, C) matrix: (R,) float32."""
    w = tl.load(w_ptr + rows[:, None] * C + offs_c[None, :]).to(tl.float32)
    return tl.sum(w * x[None, :], axis=1)


@triton.jit
def _rms_norm(x, w_ptr, eps, offs_c, C: tl.constexpr):
    """x / rms(x) * w, as F.rms_norm (float32)."""
    w = tl.load(w_ptr + offs_c).to(tl.float32)
    return x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)) * w


@triton.jit
def _draft_steps_kernel(
    x0_ptr,  # (B,) int: each row's first input
    slots_ptr,
    pos_ptr,
    greedy_ptr,  # SAMPLED: (B,) bool, True = argmax
    temp_ptr,  # SAMPLED: (B,) float32, row stride stride_t
    u_ptr,  # SAMPLED: (B, >= K) float32, row stride stride_u
    blocked_ptr,  # (V,) bool, True = never drawn
    emb_ptr,
    head_ptr,
    norm1_ptr,
    norm2_ptr,
    normf_ptr,
    wq_ptr,
    wk_ptr,
    wv_ptr,
    wo_t_ptr,
    wg_ptr,
    wu_ptr,
    wd_t_ptr,
    freq_ptr,  # (D,) float32 RoPE frequencies
    k_ptr,
    v_ptr,
    drafts_ptr,  # (B, K) int64
    q_ptr,  # SAMPLED: (B, K, V) float32
    scratch_ptr,  # (B, VP) float32: a row's logits between the head's chunks and the pick
    eps,
    qk_scale,  # 1/sqrt(D) * log2(e): scores in base-2 units
    stride_cs,
    stride_cl,
    stride_ch,
    stride_cn,
    stride_t,
    stride_u,
    K: tl.constexpr,
    N_LAYER: tl.constexpr,
    C: tl.constexpr,
    N_HEAD: tl.constexpr,
    N_KV: tl.constexpr,
    D: tl.constexpr,
    HIDDEN: tl.constexpr,
    V: tl.constexpr,
    VP: tl.constexpr,  # V rounded up to a power of two
    BLOCK_HID: tl.constexpr,  # hidden units per MLP chunk
    BLOCK_V: tl.constexpr,  # vocabulary rows per head chunk
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,  # query heads at a time, a power of two dividing N_HEAD // N_KV
    SAMPLED: tl.constexpr,
):
    GROUP: tl.constexpr = N_HEAD // N_KV
    HALF: tl.constexpr = D // 2
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    pos0 = tl.load(pos_ptr + row).to(tl.int32)
    tok = tl.load(x0_ptr + row).to(tl.int32)
    wdtype = emb_ptr.dtype.element_ty
    cdtype = k_ptr.dtype.element_ty
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_half = tl.arange(0, HALF)  # rotate-half RoPE: dimension d pairs with d + D/2
    offs_g = tl.arange(0, BLOCK_G)  # query heads of one KV head taken together (GQA)
    freq = tl.load(freq_ptr + offs_half)
    offs_v = tl.arange(0, VP)
    v_mask = offs_v < V
    blocked = tl.load(blocked_ptr + offs_v, mask=v_mask, other=1).to(tl.int1)
    if SAMPLED:
        greedy = tl.load(greedy_ptr + row).to(tl.int1)
        temperature = tl.load(temp_ptr + row * stride_t)
    for j in range(K + 1):
        p = pos0 + j  # this step's position
        angle = p.to(tl.float32) * freq
        cos = tl.cos(angle).to(wdtype).to(tl.float32)  # the tables in the model's dtype, as eager rounds them
        sin = tl.sin(angle).to(wdtype).to(tl.float32)
        x = tl.load(emb_ptr + tok.to(tl.int64) * C + offs_c).to(tl.float32)  # (C,) the residual stream
        for layer in range(N_LAYER):
            h = _rms_norm(x, norm1_ptr + layer * C, eps, offs_c, C)
            # this step's keys (rotated: the two halves of a head computed apart, so no weight row is read twice) and
            # values, every KV head, into the cache
            wk = wk_ptr + layer * (N_KV * D * C)
            wv = wv_ptr + layer * (N_KV * D * C)
            at_p = slot * stride_cs + layer * stride_cl + p * stride_cn
            for g in range(N_KV):
                k_lo = _matvec_rows(wk, g * D + offs_half, offs_c, h, C)
                k_hi = _matvec_rows(wk, g * D + HALF + offs_half, offs_c, h, C)
                tl.store(k_ptr + at_p + g * stride_ch + offs_half, (k_lo * cos - k_hi * sin).to(cdtype))
                tl.store(k_ptr + at_p + g * stride_ch + HALF + offs_half, (k_hi * cos + k_lo * sin).to(cdtype))
                tl.store(
                    v_ptr + at_p + g * stride_ch + offs_d, _matvec_rows(wv, g * D + offs_d, offs_c, h, C).to(cdtype)
                )
            tl.debug_barrier()  # the keys just stored (and the earlier steps') are seen by every thread
            if (j < K) | (layer < N_LAYER - 1):  # the last forward needs no more than its keys and values
                o = tl.zeros((C,), dtype=tl.float32)  # attention's out-projection, summed group by group
                wq = wq_ptr + layer * (N_HEAD * D * C)
                for gh in range(N_KV * (GROUP // BLOCK_G)):  # BLOCK_G query heads of one KV head at a time:
                    g = gh // (GROUP // BLOCK_G)  # their KV head, whose keys and values they read once
                    heads = gh * BLOCK_G + offs_g  # (BG,)
                    rows = heads[:, None] * D + offs_half[None, :]  # (BG, HALF): the heads' first halves
                    at_w = rows[:, :, None] * C + offs_c[None, None, :]  # (BG, HALF, C)
                    q_lo = tl.sum(tl.load(wq + at_w).to(tl.float32) * h[None, None, :], 2)
                    q_hi = tl.sum(tl.load(wq + HALF * C + at_w).to(tl.float32) * h[None, None, :], 2)
                    q_lo, q_hi = (
                        (q_lo * cos[None, :] - q_hi * sin[None, :]) * qk_scale,
                        (q_hi * cos[None, :] + q_lo * sin[None, :]) * qk_scale,
                    )  # (BG, HALF) each
                    # online softmax over the slot's cached keys 0..p
                    cache = slot * stride_cs + layer * stride_cl + g * stride_ch
                    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
                    l_i = tl.zeros((BLOCK_G,), tl.float32)
                    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
                    for n0 in range(0, p + 1, BLOCK_N):
                        offs_n = n0 + tl.arange(0, BLOCK_N)
                        at = cache + tl.minimum(offs_n, p)[:, None] * stride_cn  # clamped: loads stay in the slot
                        k_lo = tl.load(k_ptr + at + offs_half[None, :]).to(tl.float32)  # (BN, HALF)
                        k_hi = tl.load(k_ptr + at + HALF + offs_half[None, :]).to(tl.float32)
                        s = tl.sum(q_lo[:, None, :] * k_lo[None, :, :], 2) + tl.sum(
                            q_hi[:, None, :] * k_hi[None, :, :], 2
                        )
                        s = tl.where((offs_n <= p)[None, :], s, float("-inf"))  # (BG, BN) base-2 scores
                        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key n0 <= p is in the block
                        alpha = tl.exp2(m_i - m_new)  # 0 on the first block
                        pr = tl.exp2(s - m_new[:, None])
                        l_i = l_i * alpha + tl.sum(pr, axis=1)
                        vt = tl.load(v_ptr + at + offs_d[None, :]).to(tl.float32)  # (BN, D)
                        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * vt[None, :, :], axis=1)
                        m_i = m_new
                    y = acc / l_i[:, None]  # (BG, D)
                    at_o = (heads[:, None] * D + offs_d[None, :])[:, :, None] * C + offs_c[None, None, :]  # (BG, D, C)
                    wo = tl.load(wo_t_ptr + layer * (N_HEAD * D * C) + at_o).to(tl.float32)
                    o += tl.sum(tl.sum(wo * y[:, :, None], axis=1), axis=0)
                x = x + o
                h = _rms_norm(x, norm2_ptr + layer * C, eps, offs_c, C)
                mlp = tl.zeros((C,), dtype=tl.float32)
                for c0 in range(0, HIDDEN, BLOCK_HID):
                    offs_hid = c0 + tl.arange(0, BLOCK_HID)
                    hid_mask = offs_hid[:, None] < HIDDEN
                    at = layer * (HIDDEN * C) + offs_hid[:, None] * C + offs_c[None, :]
                    gate = tl.sum(tl.load(wg_ptr + at, mask=hid_mask, other=0.0).to(tl.float32) * h[None, :], 1)
                    up = tl.sum(tl.load(wu_ptr + at, mask=hid_mask, other=0.0).to(tl.float32) * h[None, :], 1)
                    act = gate / (1.0 + tl.exp(-gate)) * up  # SiLU(gate) * up, 0 on masked units
                    down = tl.load(wd_t_ptr + at, mask=hid_mask, other=0.0).to(tl.float32)
                    mlp += tl.sum(down * act[:, None], axis=0)
                x = x + mlp
        if j < K:  # the (K+1)-th forward only writes d_K's keys and values
            h = _rms_norm(x, normf_ptr, eps, offs_c, C)
            for v0 in range(0, VP, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                w = tl.load(head_ptr + offs[:, None] * C + offs_c[None, :], mask=(offs < V)[:, None], other=0.0)
                tl.store(scratch_ptr + row * VP + offs, tl.sum(w.to(tl.float32) * h[None, :], axis=1), mask=offs < V)
            tl.debug_barrier()  # the logits' chunks, stored by different threads, read whole
            logits = tl.load(scratch_ptr + row * VP + offs_v, mask=v_mask, other=float("-inf"))
            logits = tl.where(blocked, float("-inf"), logits)
            best = tl.argmax(logits, axis=0).to(tl.int32)
            if SAMPLED:
                z = logits / temperature
                e = tl.exp(z - tl.max(z, axis=0))
                probs = e / tl.sum(e, axis=0)
                probs = tl.where(greedy, tl.where(offs_v == best, 1.0, 0.0), probs)
                tl.store(q_ptr + (row * K + j) * V + offs_v, probs, mask=v_mask)
                # inverse CDF as inference_svc.speculative_resident.draw: the first id whose CDF passes u * total,
                # never past the last id of positive mass
                cdf = tl.cumsum(probs, axis=0)
                threshold = tl.load(u_ptr + row * stride_u + j) * tl.max(cdf, axis=0)
                pick = tl.sum(((cdf <= threshold) & v_mask).to(tl.int32), axis=0)
                last = tl.max(tl.where(probs > 0, offs_v, 0), axis=0)
                tok = tl.minimum(pick, last).to(tl.int32)
            else:
                tok = best
            tl.store(drafts_ptr + row * K + j, tok.to(tl.int64))
            tl.debug_barrier()  # every thread has read the scratch row before the next step writes it


class DraftCall(NamedTuple):
    """One `draft_steps` call's rows and picks (see there), as its two implementations take them."""

    slots: torch.Tensor  # (B,) int
    pos: torch.Tensor  # (B,) int
    x0: torch.Tensor  # (B,) int
    k: int
    span: int
    greedy: bool | torch.Tensor  # True, or (B,) bool
    temperature: torch.Tensor | None  # (B,) or (B, 1)
    uniforms: torch.Tensor | None  # (B, k)
    blocked: torch.Tensor | None  # (V,) bool


def _check_args(model: DraftModel, cache, a: DraftCall) -> None:
    if not isinstance(model, DraftModel):
        raise TypeError(f"model must be a DraftModel (the packed weights), got {type(model).__name__}")
    b = a.x0.shape[0]
    for name, t in (("x0", a.x0), ("slots", a.slots), ("pos", a.pos)):
        if t.shape != (b,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor of shape (B,)=({b},), got {t.dtype} {tuple(t.shape)}")
    if not isinstance(a.k, int) or a.k < 1:
        raise ValueError(f"k must be an int >= 1, got {a.k!r}")
    kc = cache.k
    want = (model.n_layer, model.n_kv_head, model.head_dim)
    if kc.dim() != 5 or (kc.shape[1], kc.shape[2], kc.shape[4]) != want or cache.v.shape != kc.shape:
        raise ValueError(f"cache must be (n_slots, {want[0]}, {want[1]}, max_len, {want[2]}), got {tuple(kc.shape)}")
    if kc.stride() != cache.v.stride() or kc.stride(4) != 1:
        raise ValueError("cache.k and cache.v must share strides, head_dim contiguous")
    if not 1 <= a.span <= kc.shape[3]:
        raise ValueError(f"span must be in [1, {kc.shape[3]}] (the cache's max_len), got {a.span}")
    if a.blocked is not None and a.blocked.shape != (model.vocab_size,):
        raise ValueError(f"blocked must have shape (V,)=({model.vocab_size},), got {tuple(a.blocked.shape)}")
    if isinstance(a.greedy, bool):
        if not a.greedy:
            raise ValueError("greedy=False: pass greedy as a (B,) bool tensor (which rows take the argmax)")
        return
    if a.greedy.shape != (b,) or a.temperature is None or a.uniforms is None:
        raise ValueError("sampled rows need greedy (B,) bool, temperature (B,) or (B, 1), uniforms (B, k)")
    if a.temperature.numel() != b or a.uniforms.shape != (b, a.k):
        raise ValueError(
            f"temperature must hold B={b} values and uniforms be (B, k)=({b}, {a.k}), got "
            f"{tuple(a.temperature.shape)} and {tuple(a.uniforms.shape)}"
        )


def draft_steps(
    model: DraftModel,
    cache,
    slots: torch.Tensor,
    pos: torch.Tensor,
    x0: torch.Tensor,
    k: int,
    *,
    span: int,
    greedy: bool | torch.Tensor = True,
    temperature: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    blocked: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draft's k + 1 one-token forwards of a round: rows b feed x0[b], d_1 .. d_k at positions pos[b] .. pos[b]+k
    of cache slot slots[b] (`cache`: a KVCache, k / v (n_slots, n_layer, n_kv_head, max_len, head_dim)), writing
    their keys and values there, each attending over its slot's positions 0..pos+j (`span` >= pos + k + 1 bounds
    them, <= max_len). d_(j+1) is step j's argmax where `greedy` (True: every row; else a (B,) bool tensor), else an
    inverse-CDF draw with uniforms[:, j] (B, k) from q = softmax(logits / temperature) ((B,) or (B, 1)); `blocked`
    (V,) bool ids are never picked. Returns (drafts (B, k) int64, q (B, k, V) float32: one-hot on greedy rows; None
    when greedy is True)."""
    call = DraftCall(slots, pos, x0, k, span, greedy, temperature, uniforms, blocked)
    _check_args(model, cache, call)
    if use_triton(impl, cache.k, x0, model.emb):
        return draft_steps_triton(model, cache, call)
    return draft_steps_reference(model, cache, call)


def draft_steps_triton(model: DraftModel, cache, a: DraftCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel (no span: each row's key loop ends at its own position)."""
    b, k, V, C, device = a.x0.shape[0], a.k, model.vocab_size, model.n_embd, a.x0.device
    vp = triton.next_power_of_2(V)
    sampled = not isinstance(a.greedy, bool)
    drafts = torch.empty(b, k, dtype=torch.long, device=device)
    q = torch.empty(b, k, V, dtype=torch.float32, device=device) if sampled else None
    if b == 0:
        return drafts, q
    scratch = torch.empty(b, vp, dtype=torch.float32, device=device)
    blocked = torch.zeros(V, dtype=torch.bool, device=device) if a.blocked is None else a.blocked
    if sampled:  # read in place (each a launch less in the round): the runner's are float32 rows
        greedy, temperature, u = a.greedy.bool(), a.temperature.reshape(b).float(), a.uniforms.float()
        u = u if u.stride(1) == 1 else u.contiguous()
    else:
        greedy, temperature, u = blocked, drafts, drafts  # not read
    rows = max(1, TILE_ELEMS // C)
    x0, slots, pos = a.x0.contiguous(), a.slots.contiguous(), a.pos.contiguous()  # read at [row]: no stride-0 views
    _draft_steps_kernel[(b,)](
        x0, slots, pos, greedy, temperature, u, blocked.bool(),
        model.emb, model.head, model.norm_1, model.norm_2, model.norm_f,
        model.wq, model.wk, model.wv, model.wo_t, model.w_gate, model.w_up, model.w_down_t, model.rope_freq,
        cache.k, cache.v, drafts, q if sampled else drafts, scratch,
        model.eps, model.head_dim**-0.5 * _LOG2E,
        *cache.k.stride()[:4], temperature.stride(0), u.stride(0),
        K=k, N_LAYER=model.n_layer, C=C, N_HEAD=model.n_head, N_KV=model.n_kv_head, D=model.head_dim,
        HIDDEN=model.hidden, V=V, VP=vp, BLOCK_HID=min(rows, triton.next_power_of_2(model.hidden)),
        BLOCK_V=min(rows, vp), BLOCK_N=BLOCK_N,
        BLOCK_G=_heads_at_a_time(model), SAMPLED=sampled, num_warps=NUM_WARPS,
    )  # fmt: skip
    return drafts, q


def _heads_at_a_time(model: DraftModel) -> int:
    """Query heads of one KV head computed together (their keys and values read once): all of a group while its
    out-projection tile (heads, head_dim, n_embd) stays within 2 TILE_ELEMS (`tiny`: 2), else fewer (at least one).
    Heads are powers of two here (n_embd and head_dim are), so any power of two up to the group divides it."""
    group = model.n_head // model.n_kv_head
    heads = group
    while heads > 1 and heads * model.head_dim * model.n_embd > 2 * TILE_ELEMS:
        heads //= 2
    return heads


def draft_steps_reference(model: DraftModel, cache, a: DraftCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`model.model.forward_cached` one step at a time (the runner's draft loop), the same picks as the kernel."""
    b = a.x0.shape[0]
    x, drafts, qs = a.x0.long(), [], []
    for j in range(a.k + 1):
        logits = model.model.forward_cached(x.view(b, 1), cache, a.slots, a.pos + j, kv_len=a.span)
        if j == a.k:
            break
        logits = logits[:, 0].float()  # (B, V)
        if a.blocked is not None:
            logits = logits.masked_fill(a.blocked, float("-inf"))
        best = logits.argmax(dim=-1)
        if isinstance(a.greedy, bool):
            x = best
        else:
            probs = torch.softmax(logits / a.temperature.reshape(b, 1).float(), dim=-1)
            probs = torch.where(a.greedy[:, None], torch.zeros_like(probs).scatter_(1, best[:, None], 1.0), probs)
            qs.append(probs)
            x = inverse_cdf(probs, a.uniforms[:, j].float())
        drafts.append(x)
    return torch.stack(drafts, dim=1), (torch.stack(qs, dim=1) if qs else None)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One id per row by inverse CDF: probs (N, V) >= 0 (need not sum to 1), u (N,) in [0, 1). Returns (N,) long,
    always an id of positive mass (a row with none: id 0). The speculative runner's draw
    (inference_svc.speculative_resident imports it), and the rule the kernel's in-program draw follows."""
    cdf = probs.cumsum(dim=-1)  # (N, V)
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)  # (N, 1)
    last = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # the last id of positive mass
    return torch.minimum(pick, last)[:, 0]
