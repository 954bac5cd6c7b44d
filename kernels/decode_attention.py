"""Decode attention: one query token per sequence over a slot-addressed KV cache (FlashDecoding).

During decoding each sequence in flight adds one token; its query attends to the `lengths[b]` keys
cached in its slot. The work is reading the cache, so the kernel is judged in GB/s of K/V bytes read.

    q        (B, H, D)                               one query token per sequence
    k_cache  (n_slots, n_kv_heads, max_len, D)       one layer's cache; any strides (the model's
    v_cache  (n_slots, n_kv_heads, max_len, D)       KVCache buffer is (n_slots, n_layer, n_kv_heads,
                                                     max_len, D), so `buf[:, layer]` is passed as is)
    slots    (B,) long     the cache slot of each sequence, or None: row b uses slot b (the engine's layout)
    lengths  (B,) long     valid keys per sequence, the current token included (1..max_len; not
                           checked on the GPU, where checking would wait for the device)
    returns  (B, H, D)     in q's dtype

GQA / MQA: H is a multiple of n_kv_heads; one program serves all the query heads of one KV head, so each
K/V tile is read once for the whole group (the group's queries are the rows of one `tl.dot`).

Split-K (FlashDecoding): with few (sequence, KV head) pairs in flight, one program per pair would leave
most SMs idle on a long context, so the sequence is cut into splits, each program writes a partial output
with its log-sum-exp, and a second kernel merges the splits. The number of splits depends only on shapes
(never on `lengths`), so a call does not sync with the host and can be captured in a CUDA graph; splits
past a sequence's length exit at once. It splits only when the (sequence, KV head) pairs are fewer than the
SMs: at batch 64 one program per pair already fills the GPU, and the merge would be a second launch for
nothing. Tiles (BLOCK_N 32..128 keys, warps, stages) are autotuned per (batch bucket, split length, group,
head size), timed inside a CUDA graph as decode calls them; the first call of a shape tunes (and syncs), so
call it once before capturing a graph.

Pieces: `decode_attention_reference` (gather + masked softmax in PyTorch, the truth),
`decode_attention_triton` (the kernels), `decode_attention` (the wrapper: `impl="auto"` takes Triton on
CUDA and the reference otherwise; "triton" / "reference" force one, as in kernels/dispatch.py).

Targets (`kernels/inference_bench.py`, batch 64 x ctx 1024 and batch 1 x ctx 8192, 6 and 12 heads, D 64, bf16, timed
inside a CUDA graph with the cache cold in L2): faster than SDPA with a padded mask on the same cache, captured the
same way, and >= 70% of measured copy bandwidth on K/V bytes read.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import Impl, num_sms, use_triton
from kernels.wo_matmul import dot_args

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_triton",
]

KEYS_ALIGN = 128  # split lengths are multiples of the largest autotuned BLOCK_N
INTERPRET_BLOCK_N = 64  # keys per inner-loop step under the CPU interpreter (no autotuning there)
MIN_KEYS_PER_SPLIT = 128  # shorter splits would spend more on their fixed work and the merge than they save
MAX_SPLITS = 64
TARGET_PROGRAMS_PER_SM = 4  # when splitting, split until the grid has about this many programs per SM
AUTOTUNE_REP_MS = 10  # per config; do_bench_cudagraph replays a graph of about rep / (lone-call ms) calls 10 times
_LOG2E = 1.4426950408889634

# (BLOCK_N, num_warps, num_stages). Built for sm_90 at D 64 (kernels/sm90_compile_test._build): 96 registers at
# BLOCK_N 64 / 4 warps, 128 at 128 / 8 warps, none spills; num_stages changed nothing there (the loop's loads are not
# multi-buffered), so memory parallelism comes from resident programs: small register footprints matter most.
_CONFIG_ENTRIES = ((32, 2, 2), (64, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2))
CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st) for bn, w, st in _CONFIG_ENTRIES]


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    lengths_ptr,
    out_ptr,
    lse_ptr,
    qk_scale,
    keys_per_split,
    batch_bucket,  # next_power_of_2(B): an autotune key only, never read
    stride_qb,
    stride_qh,
    stride_qd,
    stride_ks,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vs,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,  # out: (B, H, D) or, when split, partials (B, H, S, D)
    stride_lb,
    stride_lh,
    stride_ls,  # lse: (B, H, S), base-2 log-sum-exp of each split
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # BLOCK_D == HEAD_DIM: no mask along D
    SPLIT: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: sequence b, KV head kvh, keys [split * keys_per_split, ...) of that sequence."""
    pid_b = tl.program_id(0)
    pid_kvh = tl.program_id(1)
    pid_s = tl.program_id(2)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + pid_b).to(tl.int64)
    else:
        slot = pid_b.to(tl.int64)
    length = tl.load(lengths_ptr + pid_b).to(tl.int32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, length)

    offs_h = tl.arange(0, BLOCK_H)  # rows: the query heads of this KV head's group (padded)
    offs_d = tl.arange(0, BLOCK_D)
    heads = pid_kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # (BH, BD)

    k_base = k_ptr + slot * stride_ks + pid_kvh * stride_kh
    v_base = v_ptr + slot * stride_vs + pid_kvh * stride_vh
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max (base-2 units)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # Key indices past the end are clamped to the last valid key instead of masked: every load stays in the
        # sequence's valid keys (no NaN from a stale slot can leak in; their scores are -inf below), and unmasked
        # loads take far fewer registers (about 100 instead of 180-250 at BLOCK_N 64 on sm_90) and stay vectorised.
        offs_c = tl.minimum(offs_n, end - 1)
        k_ptrs = k_base + offs_c[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (BD, BN)
        v_ptrs = v_base + offs_c[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BN, BD)
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        s = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale  # (BH, BN)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # (BH, BN)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (start >= length) keeps l_i == 0: it writes zeros and lse = -inf, weight 0 in the merge.
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_mask = h_mask[:, None] & d_mask[None, :]
    o_ptrs = out_ptr + pid_b * stride_ob + heads[:, None] * stride_oh + pid_s * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    if SPLIT:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + pid_b * stride_lb + heads * stride_lh + pid_s * stride_ls, lse, mask=h_mask)


@triton.jit
def _decode_attention_merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_pd,  # partials (B, H, S, D) fp32
    stride_lb,
    stride_lh,
    stride_ls,  # lse (B, H, S) fp32
    stride_ob,
    stride_oh,
    stride_od,  # out (B, H, D)
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (b, h): weight each split's normalised output by exp2(lse - max lse)."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        lse_ptr + pid_b * stride_lb + pid_h * stride_lh + offs_s * stride_ls, mask=s_mask, other=float("-inf")
    )  # (BS,)
    w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 always holds a key, so the max is finite
    part = tl.load(
        part_ptr + pid_b * stride_pb + pid_h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BS, BD)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)  # (BD,)
    tl.store(
        out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


_decode_attention_split_tuned = triton.autotune(
    configs=CONFIGS,
    key=["batch_bucket", "keys_per_split", "GROUP", "HEAD_DIM", "SPLIT"],
    do_bench=lambda fn, quantiles: triton.testing.do_bench_cudagraph(fn, rep=AUTOTUNE_REP_MS, quantiles=quantiles),
)(_decode_attention_split_kernel)


def _check_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor | None, lengths: torch.Tensor
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must have shape (B, H, D), got {tuple(q.shape)}")
    b, h, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape[3] != d or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both have shape (n_slots, n_kv_heads, max_len, D={d}), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if h % k_cache.shape[1] != 0:
        raise ValueError(f"q heads H={h} must be a multiple of n_kv_heads={k_cache.shape[1]}")
    if slots is None and k_cache.shape[0] < b:
        raise ValueError(f"slots=None reads slots 0..B-1, but the cache has {k_cache.shape[0]} slots for B={b}")
    for name, t in (("slots", slots), ("lengths", lengths)):
        if t is None and name == "slots":
            continue
        if t.shape != (b,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor of shape (B,)=({b},), got {t.dtype} {tuple(t.shape)}")


def _default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor | None,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Gather each sequence's cache, mask keys at or past its length, softmax in fp32: (B, H, D)."""
    _check_inputs(q, k_cache, v_cache, slots, lengths)
    b, h, d = q.shape
    n_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    slots = torch.arange(b, device=q.device) if slots is None else slots
    k = k_cache[slots].float().repeat_interleave(h // n_kv, dim=1)  # (B, H, L, D)
    v = v_cache[slots].float().repeat_interleave(h // n_kv, dim=1)  # (B, H, L, D)
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k) * _default_scale(scale, d)  # (B, H, L)
    valid = torch.arange(max_len, device=q.device)[None, :] < lengths[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhl,bhld->bhd", scores.softmax(dim=-1), v).to(q.dtype)


def _pick_num_splits(batch: int, n_kv: int, max_len: int, num_sms: int) -> int:
    """No split when the (sequence, KV head) pairs fill the SMs; else splits that give about TARGET_PROGRAMS_PER_SM
    programs per SM, each at least MIN_KEYS_PER_SPLIT long. Shapes only: never the lengths (no host sync)."""
    if batch * n_kv >= num_sms:
        return 1
    wanted = triton.cdiv(TARGET_PROGRAMS_PER_SM * num_sms, batch * n_kv)
    return max(1, min(wanted, triton.cdiv(max_len, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


MIN_HEAD_DIM = 16  # narrower heads take the reference under impl="auto" (tl.dot's K >= 16 on sm_80/sm_90)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor | None,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """The Triton kernels; `num_splits` overrides the heuristic (1 = no split, no merge kernel); `config` (one of
    CONFIGS) launches that tile instead of the autotuner's pick (the tests run each)."""
    _check_inputs(q, k_cache, v_cache, slots, lengths)
    # the kernel reads row b's slot and length at [b]: a strided or expanded index view (stride 0, as
    # t[:, None].expand(...).reshape(-1) gives for one row) would read past it
    slots, lengths = (None if slots is None else slots.contiguous()), lengths.contiguous()
    b, h, d = q.shape
    n_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = h // n_kv
    if num_splits is None:
        num_splits = _pick_num_splits(b, n_kv, max_len, num_sms(q.device))
    if not 1 <= num_splits <= max_len:
        raise ValueError(f"num_splits must be in 1..max_len={max_len}, got {num_splits}")
    align = KEYS_ALIGN if q.is_cuda else INTERPRET_BLOCK_N
    keys_per_split = triton.cdiv(triton.cdiv(max_len, num_splits), align) * align
    num_splits = triton.cdiv(max_len, keys_per_split)  # rounding up the split may leave fewer splits
    split = num_splits > 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, D)
    if split:
        part = torch.empty((b, h, num_splits, d), device=q.device, dtype=torch.float32)
        lse = torch.empty((b, h, num_splits), device=q.device, dtype=torch.float32)
        dst, lse_strides = part, lse.stride()
    else:
        lse = out  # unused: SPLIT=False never touches it
        dst = out.unsqueeze(2)  # (B, H, 1, D)
        lse_strides = (0, 0, 0)
    block_d = triton.next_power_of_2(d)
    args = (
        q,
        k_cache,
        v_cache,
        lengths if slots is None else slots,  # never read without slots
        lengths,
        dst,
        lse,
        _default_scale(scale, d) * _LOG2E,
        keys_per_split,
        triton.next_power_of_2(b),
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *dst.stride(),
        *lse_strides,
    )
    meta = dict(
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        EVEN_D=block_d == d,
        SPLIT=split,
        HAS_SLOTS=slots is not None,
        **dot_args(q),
    )
    grid = (b, n_kv, num_splits)
    if config is not None:
        _decode_attention_split_kernel[grid](
            *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    elif q.is_cuda:
        _decode_attention_split_tuned[grid](*args, **meta)
    else:
        _decode_attention_split_kernel[grid](*args, **meta, BLOCK_N=INTERPRET_BLOCK_N, num_warps=4, num_stages=2)
    if split:
        _decode_attention_merge_kernel[(b, h)](
            part,
            lse,
            out,
            num_splits,
            *part.stride(),
            *lse.stride(),
            *out.stride(),
            HEAD_DIM=d,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor | None,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Attention of q (B, H, D) over each sequence's cached keys -> (B, H, D); slots None: row b uses slot b.

    impl="auto": Triton when every tensor is on CUDA and the head is at least MIN_HEAD_DIM wide (the grouped-query
    kernel's tl.dot needs K >= 16 on the GPU; the interpreter takes any), the reference otherwise (kernels/dispatch.py).
    """
    tensors = (q, k_cache, v_cache, lengths) if slots is None else (q, k_cache, v_cache, slots, lengths)
    if use_triton(impl, *tensors, supported=q.shape[-1] >= MIN_HEAD_DIM or not q.is_cuda):
        return decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale)
    return decode_attention_reference(q, k_cache, v_cache, slots, lengths, scale)
