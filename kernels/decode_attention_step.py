"""One decode step's attention in one launch: QK-norm and RoPE on the new q and k, the new k/v written into the KV
cache, and attention of the new query over the row's cached keys plus the new one, all in one launch.

Input is the fused q/k/v projection of one new token per row, qkv (M, (H + 2 Hkv) D): q heads, then k heads, then v
heads (Attention.fuse_qkv's layout). One program serves one (row, KV head): it loads the group's queries and the new
key/value, normalises (QK-norm, no learned scale) and rotates them (rotate-half RoPE, GPT-NeoX / HF Llama layout,
cos/sin computed in the kernel from the position), stores k/v at cache[slot, layer, kvh, pos], then runs an online
softmax whose first key is the new one, held in registers, and whose loop reads cached keys [0, pos). It never reads
what it wrote, so no barrier is needed, and a row at position 0 reads no cache at all. Where (row, KV head) programs
are too few to fill the GPU (`key_splits`: B=1..16), each one's keys are cut into splits of whole blocks, a program
each (FlashDecoding); split 0 also writes the cache and takes the new key, and the last split of a (row, KV head) to
finish (an atomic ticket, as wo_matmul's split-K) merges the partials in split order, in the same launch.
Rows that share a slot (a speculative verify: row j at pos + j attends to the rows before it) need every row's k/v
stored before any row attends: `write_first` adds a launch that only stores them (WRITE_ONLY); the attention launch
then reads them from the cache (and stores its own row's again: the same bytes).

    k_cache, v_cache  the KVCache buffers, (n_slots, n_layer, Hkv, max_len, D), any strides; `layer` picks one
    slots, positions  (M,) int: row m's slot and the position of its new token (its keys: 0..pos, pos + 1 in all)
    returns           (M, H D) in qkv's dtype: the heads side by side, ready for the out-projection

`MAX_SINGLE_PASS_KEYS` bounds the spans the model sends here (beyond, `kernels.decode_attention`'s kernels). No
autotuning: the positions are data (a tuning run would see whatever the warm-up held), so the tile is a heuristic:
BLOCK_N * BLOCK_H = 64 (the products (BH, BN, D) of the FMA score and value sums stay at 32 fp32 values per thread at
D 64, 4 warps).

    decode_attention_step            wrapper; impl="auto": Triton for CUDA inputs, the reference otherwise
    decode_attention_step_triton     the kernel
    decode_attention_step_reference  PyTorch: norm, rotate, write (index_put), `decode_attention_reference`
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.decode_attention import decode_attention_reference
from kernels.dispatch import Impl, num_sms, split_tickets, use_triton

__all__ = [
    "MAX_SINGLE_PASS_KEYS",
    "decode_attention_step",
    "decode_attention_step_reference",
    "decode_attention_step_triton",
    "key_splits",
]

MAX_SINGLE_PASS_KEYS = 1024  # beyond, few programs walk too many keys: the split kernels of decode_attention win
# Split keys (FlashDecoding, merged in the same launch by the last split to finish) below this many (row, KV head)
# programs: at B=1 shakespeare-char's 6 programs walked their keys one 64-key block after another (37 us per step in
# the engine against 7 us at position 0, H200, tools.serve_probe at 09a3273).
SPLIT_BELOW_PROGRAMS = 128
MAX_SPLITS = 16
TILE_KEYS_X_HEADS = 64  # BLOCK_N * BLOCK_H
NUM_WARPS = 4
_LOG2E = 1.4426950408889634


@triton.jit
def _norm_rotate(x, x_partner, sign, cos, sin, eps, QK_NORM: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """QK-norm (x / rms(x) per head, no learned scale) then rotate-half RoPE of rows x (R, BD) fp32, x_partner being
    x's dims d + D/2 (mod D), sign -1 for the first half. fp32 throughout (eager rounds to the model's dtype after the
    norm too: within bf16 tolerance of this)."""
    if QK_NORM:
        scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)  # both halves hold the same head's values
        x = x * scale[:, None]
        x_partner = x_partner * scale[:, None]
    if ROPE:
        x = x * cos[None, :] + sign[None, :] * x_partner * sin[None, :]
    return x


@triton.jit
def _attention_step_kernel(
    qkv_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    pos_ptr,
    out_ptr,
    ws_ptr,  # SPLITS > 1: fp32 partials (M, H, SPLITS, BLOCK_D + 2): acc, then m and l
    ticket_ptr,  # SPLITS > 1: int32 tickets, one per (row, KV head), 0 between launches
    qk_scale,  # 1/sqrt(D) * log2(e): scores in base-2 units
    log2_theta,
    qk_eps,
    stride_qm,
    stride_ks,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vs,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_om,
    N_HEAD: tl.constexpr,
    N_KV: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # HEAD_DIM // 2: RoPE pairs dimension d with d + HALF
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr,
    QK_NORM: tl.constexpr,
    SPLITS: tl.constexpr,  # programs per (row, KV head), each over SPLIT_KEYS cached keys
    SPLIT_KEYS: tl.constexpr,
    SPLITS_P2: tl.constexpr,  # SPLITS rounded up to a power of two (the merge's block)
    WRITE_ONLY: tl.constexpr = False,  # store the new k/v and stop (rows sharing a slot: all written, then attend)
):
    pid_m = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + pid_m).to(tl.int64)
    pos = tl.load(pos_ptr + pid_m).to(tl.int32)
    dtype = qkv_ptr.dtype.element_ty

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    partner = tl.where(d_mask, partner, 0)
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    # RoPE tables for this position, as model.layers.rope_cos_sin: angle = pos * theta^(-2i/D), i = d mod D/2; rounded
    # to the model's dtype as the eager tables are.
    inv_freq = tl.exp2(-((offs_d % HALF) * 2).to(tl.float32) / HEAD_DIM * log2_theta)
    angle = pos.to(tl.float32) * inv_freq
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)

    row = qkv_ptr + pid_m * stride_qm
    q_mask = h_mask[:, None] & d_mask[None, :]
    q_cols = heads[:, None] * HEAD_DIM
    q = tl.load(row + q_cols + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)  # (BH, BD)
    q_p = tl.load(row + q_cols + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q = _norm_rotate(q, q_p, sign, cos, sin, qk_eps, QK_NORM, ROPE, HEAD_DIM).to(dtype).to(tl.float32)
    k_col = (N_HEAD + kvh) * HEAD_DIM
    k_new = tl.load(row + k_col + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]  # (1, BD)
    k_p = tl.load(row + k_col + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    k_new = _norm_rotate(k_new, k_p, sign, cos, sin, qk_eps, QK_NORM, ROPE, HEAD_DIM)
    v_new = tl.load(row + (N_HEAD + N_KV + kvh) * HEAD_DIM + offs_d, mask=d_mask, other=0.0)

    # The cache write (split 0): the new token's key and value, at its position in the row's slot.
    k_base = k_ptr + slot * stride_ks + kvh * stride_kh
    v_base = v_ptr + slot * stride_vs + kvh * stride_vh
    k_c = tl.sum(k_new, axis=0).to(k_ptr.dtype.element_ty)  # (BD,)
    v_c = v_new.to(v_ptr.dtype.element_ty)
    if WRITE_ONLY:
        tl.store(k_base + pos * stride_kn + offs_d * stride_kd, k_c, mask=d_mask)
        tl.store(v_base + pos * stride_vn + offs_d * stride_vd, v_c, mask=d_mask)
    else:
        _attend(q, k_c, v_c, k_base, v_base, pos, split, pid_m, kvh, heads, h_mask, d_mask, q_mask, q_cols, offs_d,
                out_ptr, ws_ptr, ticket_ptr, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_om,
                N_HEAD, N_KV, BLOCK_H, BLOCK_D, BLOCK_N, SPLITS, SPLIT_KEYS, SPLITS_P2)  # fmt: skip


@triton.jit
def _attend(
    q, k_c, v_c, k_base, v_base, pos, split, pid_m, kvh, heads, h_mask, d_mask, q_mask, q_cols, offs_d,
    out_ptr, ws_ptr, ticket_ptr, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_om,
    N_HEAD: tl.constexpr, N_KV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, SPLIT_KEYS: tl.constexpr, SPLITS_P2: tl.constexpr,
):  # fmt: skip
    """The cache write (split 0) and the attention of the (row, KV head)'s query heads over keys 0..pos."""
    if split == 0:
        tl.store(k_base + pos * stride_kn + offs_d * stride_kd, k_c, mask=d_mask)
        tl.store(v_base + pos * stride_vn + offs_d * stride_vd, v_c, mask=d_mask)
        # Online softmax, seeded with the new key (from registers, as stored: in the cache's dtype).
        m_i = tl.sum(q * k_c.to(tl.float32)[None, :], axis=1) * qk_scale  # (BH,)
        l_i = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32) + v_c.to(tl.float32)[None, :]
    else:  # another split's keys only: nothing seen yet
        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    # This split's cached keys: [split * SPLIT_KEYS, min(pos, (split + 1) * SPLIT_KEYS)) (all of 0..pos at SPLITS 1)
    lo = split * SPLIT_KEYS
    hi = tl.minimum(pos, lo + SPLIT_KEYS)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        # Clamped, not masked (as kernels/decode_attention.py): every load stays in the row's valid keys.
        offs_c = tl.minimum(offs_n, pos - 1)
        kv_mask = d_mask[None, :]
        k = tl.load(k_base + offs_c[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_c[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * qk_scale  # (BH, BN)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block holds a key below hi
        alpha = tl.exp2(m_i - m_new)  # 0 from an empty start (m_i -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new
    out_ptrs = out_ptr + pid_m * stride_om + q_cols + offs_d[None, :]
    if SPLITS == 1:
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # FlashDecoding's merge in the same launch: each split leaves (acc, m, l) per head; the last split of the (row,
        # KV head) to take its ticket rescales them to the largest m, sums in split order and writes the output.
        WS: tl.constexpr = BLOCK_D + 2
        rec = ws_ptr + (pid_m * N_HEAD + heads) * (SPLITS * WS)  # (BH,): split 0's record of each head
        tl.store(rec[:, None] + split * WS + offs_d[None, :], acc, mask=h_mask[:, None])
        tl.store(rec + split * WS + BLOCK_D, m_i, mask=h_mask)
        tl.store(rec + split * WS + BLOCK_D + 1, l_i, mask=h_mask)
        tl.debug_barrier()  # every thread's partials are written before the ticket (which releases them) is taken
        ticket = ticket_ptr + pid_m * N_KV + kvh
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            # every split's record in one round of loads (a loop over splits was one L2 round trip per split)
            offs_s = tl.arange(0, SPLITS_P2)
            hs_mask = h_mask[:, None] & (offs_s < SPLITS)[None, :]
            at = rec[:, None] + offs_s[None, :] * WS  # (BH, S)
            m_s = tl.load(at + BLOCK_D, mask=hs_mask, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(at + BLOCK_D + 1, mask=hs_mask, other=0.0, cache_modifier=".cg")
            a_s = tl.load(at[:, :, None] + offs_d[None, None, :], mask=hs_mask[:, :, None], other=0.0,
                          cache_modifier=".cg")  # fmt: skip
            m_all = tl.max(m_s, axis=1)  # finite for every real head: split 0 holds the new key
            w = tl.exp2(m_s - m_all[:, None])  # 0 for a split with no keys (m -inf, l 0)
            l_all = tl.sum(w * l_s, axis=1)
            total = tl.sum(w[:, :, None] * a_s, axis=1)
            tl.store(out_ptrs, (total / l_all[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
            tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")  # the next launch (or graph replay) starts at 0


def key_splits(units: int, max_len: int, block_n: int, sms: int) -> tuple[int, int]:
    """(splits, keys per split) for `units` (row, KV head) programs over caches of max_len keys: one program each
    where they fill the GPU; below that, each unit's keys cut into splits of whole BLOCK_N blocks, up to about one
    program per SM in all (B=1: 6 units walking 256 keys 64 at a time took 4 dependent steps per layer; in splits of
    64, one). Splits past a row's position find no keys and leave an empty partial."""
    if units >= SPLIT_BELOW_PROGRAMS or max_len <= block_n:
        return 1, max_len
    splits = min(triton.cdiv(max_len, block_n), triton.cdiv(sms, units), MAX_SPLITS)
    split_keys = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    return triton.cdiv(max_len, split_keys), split_keys


def _check(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    positions: torch.Tensor,
    n_head: int,
) -> tuple[int, int, int]:
    """Validate; returns (M, n_kv_head, head_dim)."""
    if k_cache.dim() != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both have shape (n_slots, n_layer, n_kv_head, max_len, head_dim), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    n_layer, n_kv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[4]
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer must be in [0, {n_layer}), got {layer}")
    if n_head % n_kv != 0:
        raise ValueError(f"n_head={n_head} must be a multiple of the cache's n_kv_head={n_kv}")
    if qkv.dim() != 2 or qkv.shape[1] != (n_head + 2 * n_kv) * d or qkv.stride(1) != 1:
        raise ValueError(
            f"qkv must be (M, (n_head + 2 n_kv_head) head_dim) = (M, {(n_head + 2 * n_kv) * d}), contiguous along "
            f"its columns, got {tuple(qkv.shape)}"
        )
    m = qkv.shape[0]
    for name, t in (("slots", slots), ("positions", positions)):
        if t.shape != (m,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor of shape (M,)=({m},), got {t.dtype} {tuple(t.shape)}")
    return m, n_kv, d


def _rotate_half(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x (M, heads, D) at positions (M,), fp32 tables rounded to x's dtype."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = (positions.float()[:, None] * inv_freq).repeat(1, 2)[:, None, :]  # (M, 1, D)
    cos, sin = angles.cos().to(x.dtype).float(), angles.sin().to(x.dtype).float()
    xf = x.float()
    rotated = torch.cat((-xf[..., d // 2 :], xf[..., : d // 2]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def decode_attention_step_reference(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    positions: torch.Tensor,
    n_head: int,
    *,
    rope_theta: float | None = None,
    qk_norm_eps: float | None = None,
) -> torch.Tensor:
    """PyTorch: QK-norm, RoPE, the cache write, then `decode_attention_reference` over keys 0..pos. (M, H D)."""
    m, n_kv, d = _check(qkv, k_cache, v_cache, layer, slots, positions, n_head)
    q, k, v = qkv.view(m, n_head + 2 * n_kv, d).split([n_head, n_kv, n_kv], dim=1)  # (M, heads, D)
    if qk_norm_eps is not None:
        unit = lambda t: (t.float() * torch.rsqrt(t.float().square().mean(-1, keepdim=True) + qk_norm_eps)).to(t.dtype)
        q, k = unit(q), unit(k)
    if rope_theta is not None:
        q, k = _rotate_half(q, positions, rope_theta), _rotate_half(k, positions, rope_theta)
    slots, positions = slots.long(), positions.long()
    k_cache[slots, layer, :, positions] = k.to(k_cache.dtype)
    v_cache[slots, layer, :, positions] = v.to(v_cache.dtype)
    y = decode_attention_reference(q, k_cache[:, layer], v_cache[:, layer], slots, positions + 1)  # (M, H, D)
    return y.reshape(m, n_head * d)


def decode_attention_step_triton(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    positions: torch.Tensor,
    n_head: int,
    *,
    rope_theta: float | None = None,
    qk_norm_eps: float | None = None,
    write_first: bool = False,
) -> torch.Tensor:
    """The kernel: one launch of (M, n_kv_head) programs (`write_first`: two, see `decode_attention_step`)."""
    m, n_kv, d = _check(qkv, k_cache, v_cache, layer, slots, positions, n_head)
    slots, positions = slots.contiguous(), positions.contiguous()  # read at [m]: no expanded (stride-0) views
    if rope_theta is not None and d % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    group = n_head // n_kv
    block_h = triton.next_power_of_2(group)
    block_n = max(16, TILE_KEYS_X_HEADS // block_h)
    block_d = triton.next_power_of_2(d)
    out = torch.empty((m, n_head * d), device=qkv.device, dtype=qkv.dtype)
    k_layer, v_layer = k_cache[:, layer], v_cache[:, layer]  # (n_slots, Hkv, max_len, D) views
    splits, split_keys = key_splits(m * n_kv, k_cache.shape[3], block_n, num_sms(qkv.device))
    if splits > 1:
        ws = torch.empty((m, n_head, splits, block_d + 2), device=qkv.device, dtype=torch.float32)
        tickets = split_tickets(qkv.device, "decode_attention_step")
    else:
        ws = tickets = out  # not read
    args = (
        qkv,
        k_layer,
        v_layer,
        slots,
        positions,
        out,
        ws,
        tickets,
        _LOG2E / math.sqrt(d),
        math.log2(rope_theta) if rope_theta is not None else 0.0,
        qk_norm_eps if qk_norm_eps is not None else 0.0,
        qkv.stride(0),
        *k_layer.stride()[0:2],
        k_layer.stride(2),
        k_layer.stride(3),
        *v_layer.stride()[0:2],
        v_layer.stride(2),
        v_layer.stride(3),
        out.stride(0),
    )
    meta = dict(
        N_HEAD=n_head,
        N_KV=n_kv,
        GROUP=group,
        HEAD_DIM=d,
        HALF=max(1, d // 2),
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        ROPE=rope_theta is not None,
        QK_NORM=qk_norm_eps is not None,
        SPLIT_KEYS=split_keys,
        num_warps=NUM_WARPS,
    )
    if write_first:  # every row's k/v stored first, by a launch of its own; then the attention launch
        _attention_step_kernel[(m, n_kv, 1)](*args, **meta, SPLITS=1, SPLITS_P2=1, WRITE_ONLY=True)
    _attention_step_kernel[(m, n_kv, splits)](*args, **meta, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits))
    return out


def decode_attention_step(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    positions: torch.Tensor,
    n_head: int,
    *,
    rope_theta: float | None = None,
    qk_norm_eps: float | None = None,
    write_first: bool = False,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Attention of each row's new token (its q/k/v in qkv (M, (H + 2 Hkv) D)) over its slot's keys 0..pos, the new
    k/v written to the cache at (slot, layer, pos) first. rope_theta None: no RoPE; qk_norm_eps None: no QK-norm.
    `write_first`: rows may share a slot (a speculative verify: row j of a slot at pos + j attends to the rows before
    it): every row's k/v is stored before any row attends (on the GPU one launch more; the reference always writes
    first). Without it each row's program writes its own k/v as it reads the others', so rows must not share a slot.
    Returns (M, H D) in qkv's dtype."""
    if use_triton(impl, qkv, k_cache, v_cache, slots, positions):
        kw = dict(write_first=write_first)
        fn = decode_attention_step_triton
    else:
        kw, fn = {}, decode_attention_step_reference
    return fn(
        qkv, k_cache, v_cache, layer, slots, positions, n_head, rope_theta=rope_theta, qk_norm_eps=qk_norm_eps, **kw
    )
