"""Flash attention (FlashAttention-2) forward and backward in Triton: causal or not, grouped KV heads (GQA), and
attention-probability dropout inside the kernels.

Scores never reach memory: each forward program streams K/V blocks past a block of queries with an online softmax,
keeping only the per-row log-sum-exp (LSE, taken before dropout, as FlashAttention does) for the backward, which
recomputes the probabilities. The backward is ONE launch, as in the Triton fused-attention tutorial's design: a
program either owns a block of keys and accumulates dK, dV over every query (and every query head sharing its KV
head), or owns a block of queries and accumulates dQ. delta = rowsum(dO * O), the softmax-backward term, is
computed in place from the O and dO tiles each program loads anyway, so there is no preprocess launch and no delta
buffer. Causal loops run the blocks wholly below the diagonal without a mask and only the diagonal blocks masked.

Dropout (probability p) keeps a probability with chance 1 - p and scales it by 1 / (1 - p), as SDPA's dropout does.
The keep mask is never stored: Philox (counter-based) turns (seed, query head, query row, key column) into the same
bits in the forward and the backward. One Philox call gives four 32-bit words, used for four adjacent keys.

Shapes: q (B, H, T, D), k and v (B, H_kv, T, D) with H % H_kv == 0; D in {16, 32, 64, 128}; fp16, bf16 or fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
import triton.testing

from kernels.dispatch import Impl, use_triton

__all__ = [
    "FlashAttentionFunction",
    "flash_attention",
    "dropout_keep_mask",
    "reference",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_DTYPES",
    "MAX_DROPOUT_T",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the fast hardware path
RNG_BITS = 31  # the keep test compares 31 random bits with round(p * 2**31): always an int32 on both sides
MAX_DROPOUT_T = 65536  # Philox counters (row * cdiv(T, 4) + key // 4) stay unique below 2**32 up to here
SEED_HIGH = 2**31 - 1  # dropout seeds are drawn from torch's generator in [0, SEED_HIGH)

# Fixed blocks for the CPU interpreter (no autotuning there): small, and unequal so that the causal diagonal split
# (BLOCK_M a multiple of BLOCK_N in the forward; BLOCK_BIG a multiple of BLOCK_SMALL in the backward) is exercised.
INTERPRET_FWD_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16)
INTERPRET_BWD_BLOCKS = dict(BLOCK_BIG=32, BLOCK_SMALL=16)
# Every block of every config divides this, so T % EVEN_T_MULTIPLE == 0 means no bounds masks are needed; passed as a
# constexpr from the host (no @triton.heuristics wrapper: one less Python layer in a launch that small shapes feel).
EVEN_T_MULTIPLE = 128
INTERPRET_EVEN_T_MULTIPLE = 32
MASK_BLOCKS = (64, 64)  # blocks of the debug keep-mask kernel on a GPU
INTERPRET_MASK_BLOCKS = (32, 32)  # and on CPU: a third tiling, beside the forward's and the backward's


def _configs(names: tuple[str, str], entries: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(block, block, num_stages, num_warps) -> autotune configs with the two named block sizes."""
    return [triton.Config({names[0]: a, names[1]: b}, num_stages=s, num_warps=w) for a, b, s, w in entries]


# Forward: BLOCK_M queries per program, a loop over BLOCK_N keys (BLOCK_M % BLOCK_N == 0 for the causal diagonal).
# From the Triton tutorial's Hopper space (BLOCK_M 64/128, BLOCK_N 32-128, 2-4 stages, 4/8 warps): the sm_90 builds
# at D = 64 that use no more than ~240 registers (128/64 at 4 warps and 128/32 take 251 and 234 with dropout). Few
# configs: each new (head dim, dtype, causal, dropout) compiles them all on its first call.
FWD_CONFIGS = _configs(
    ("BLOCK_M", "BLOCK_N"), [(64, 32, 4, 4), (64, 64, 3, 4), (128, 64, 3, 8), (128, 64, 4, 8), (128, 128, 3, 8)]
)
# Backward: a dK/dV program owns BLOCK_BIG keys and loops over queries BLOCK_SMALL at a time; a dQ program owns
# BLOCK_BIG queries and loops over keys BLOCK_SMALL at a time. Built for sm_90 at D = 64 (divisibility hints as a
# real launch has them): 128/32 spills ~300 bytes at 4 warps (the tutorial's choice, kept for the tuner to judge)
# and none at 8; 64/32 and 32/32 spill none; 64/64 and 128/64 spill ~100 bytes; 128/128 would spill far more.
BWD_CONFIGS = _configs(
    ("BLOCK_BIG", "BLOCK_SMALL"),
    [(128, 32, 2, 8), (128, 32, 3, 8), (128, 32, 3, 4), (128, 64, 2, 8)]
    + [(64, 32, 3, 4), (64, 32, 4, 8), (64, 64, 3, 8), (32, 32, 3, 4)],
)
# T enters the key rounded up to a power of two, so varying prompt lengths do not each trigger a tuning run.
AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "DROPOUT"]
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25
BWD_MAX_BLOCK_D128 = 64  # at D = 128, a backward program's dK + dV (or dQ) accumulators past 64 rows spill


def _autotune_bench(kernel_call, quantiles):
    """Shorter timing windows than Triton's default (25/100 ms): the configs differ by far more than the noise."""
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _prune(block: str, max_block_d128: int | None = None):
    """An early_config_prune: drops configs whose `block` (the per-program block) exceeds the padded T, and at
    D > 64 those whose `block` exceeds `max_block_d128`; always keeps at least the smallest config."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        t_bucket, head_dim = args["T_BUCKET"], args["HEAD_DIM"]
        small = [c for c in configs if c.kwargs[block] <= max(t_bucket, 32)]
        if head_dim > 64 and max_block_d128 is not None:
            small = [c for c in small if c.kwargs[block] <= max_block_d128]
        return small or [min(configs, key=lambda c: math.prod(c.kwargs.values()))]

    return prune


def _autotune(configs: list[triton.Config], prune):
    return triton.autotune(
        configs=configs, key=AUTOTUNE_KEY, do_bench=_autotune_bench, prune_configs_by={"early_config_prune": prune}
    )


@triton.jit
def _load(ptrs, mask, other, EVEN_T: tl.constexpr):
    """tl.load, bounds-masked only where T does not fill whole blocks."""
    if EVEN_T:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _store(ptrs, value, mask, EVEN_T: tl.constexpr):
    if EVEN_T:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _batch_heads(off_bh, H, GROUP):
    """(batch as int64, query head, KV head) of a program's batch * H + head index."""
    h = off_bh % H
    return (off_bh // H).to(tl.int64), h, h // GROUP


@triton.jit
def _keep(seed, bh, threshold, offs_m, start_n, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask (BLOCK_M, BLOCK_N) of query head `bh`, rows offs_m, keys start_n .. start_n + BLOCK_N.

    Element (row, key) takes word key % 4 of Philox(seed; counter row * cdiv(T, 4) + key // 4, bh): a function of
    (seed, bh, row, key) only, so any tiling of the forward, the backward or the debug mask kernel sees the same bit.
    """
    quads = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = (offs_m[:, None] * ((T + 3) // 4) + quads[None, :]).to(tl.uint32)  # (BLOCK_M, BLOCK_N // 4)
    c1 = (c0 * 0 + bh).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c1 * 0, c1 * 0)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (BLOCK_M, BLOCK_N // 4, 2, 2): word 2a + b at [..., a, b]
    words = tl.reshape(words, (BLOCK_M, BLOCK_N))  # key 4q + w holds word w of quad q
    return (words >> 1).to(tl.int32) >= threshold  # RNG_BITS = 31 random bits


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qk_scale, offs_m, offs_d, lo, hi, T, seed, bh,
    threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, EVEN_T: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    """Online softmax of one query block over the key blocks [lo, hi). l_i sums the probabilities before dropout
    (the softmax normaliser); acc sums only the kept ones times V (the 1 / (1 - p) comes at the end)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N): K^T
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
        kt = _load(kt_ptrs, offs_n[None, :] < T, 0.0, EVEN_T)
        qk = tl.dot(q, kt)  # (BLOCK_M, BLOCK_N)
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if not EVEN_T:
            qk = tl.where(offs_n[None, :] < T, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score: scale and shift in log2 units
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, threshold, offs_m, start_n, T, BLOCK_M, BLOCK_N), p, 0.0)
        v = _load(v_ptrs, offs_n[:, None] < T, 0.0, EVEN_T)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, qk_scale, seed, threshold, keep_scale, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh,
    stride_kt, stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, H, GROUP, T, T_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, head). Writes O and the base-2 log-sum-exp of the scores.

    Causal: the last query blocks do the most work, so they are handed out first (a shorter tail of lone programs).
    """
    if isinstance(seed, tl.tensor):  # (an int seed of 1 arrives as a constexpr)
        if seed.dtype.is_ptr():  # a seed tensor on the device (kernels.compile_ops: fresh in every CUDA-graph replay)
            seed = tl.load(seed)
    start_m = tl.program_id(0)
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - start_m
    off_bh = tl.program_id(1)
    b, h, hk = _batch_heads(off_bh, H, GROUP)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = _load(q_ptrs, offs_m[:, None] < T, 0.0, EVEN_T)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # [0, hi_unmasked) needs no causal mask; [hi_unmasked, hi) is the diagonal (causal) or nothing
    if CAUSAL:
        hi_unmasked = start_m * BLOCK_M
    else:
        hi_unmasked = T
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qk_scale, offs_m, offs_d, 0, hi_unmasked, T, seed,
        off_bh, threshold, BLOCK_M, BLOCK_N, False, EVEN_T, DROPOUT,
    )  # fmt: skip
    if CAUSAL:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qk_scale, offs_m, offs_d, hi_unmasked,
            hi_unmasked + BLOCK_M, T, seed, off_bh, threshold, BLOCK_M, BLOCK_N, True, EVEN_T, DROPOUT,
        )  # fmt: skip
    acc = acc * (keep_scale / l_i)[:, None]
    lse = m_i + tl.math.log2(l_i)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    lse_ptrs = LSE + off_bh.to(tl.int64) * T + offs_m
    _store(lse_ptrs, lse, offs_m < T, EVEN_T)
    _store(o_ptrs, acc.to(O.dtype.element_ty), offs_m[:, None] < T, EVEN_T)


_attn_fwd_tuned = _autotune(FWD_CONFIGS, _prune("BLOCK_M"))(_attn_fwd)


@triton.jit
def _dropout_mask_kernel(KEEP, seed, threshold, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug: writes the keep mask (B, H, T, T) as int8 that the attention kernels use for this seed and p."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_bh = tl.program_id(1)
    base = KEEP + off_bh.to(tl.int64) * T * T
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _keep(seed, off_bh, threshold, offs_m, start_n, T, BLOCK_M, BLOCK_N)
        mask = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        tl.store(base + offs_m[:, None] * T + offs_n[None, :], keep.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Backward
#
# With dropout, O = (P * Z) V where P = softmax(S) (before dropout) and Z = keep / (1 - p). Then
# dV = (P * Z)^T dO, dP = (dO V^T) * Z, dS = P * (dP - delta) with delta = rowsum(P * dP) = rowsum(dO * O).


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, o_base, do_base, lse_base, stride_qt, stride_ot, stride_dot, qk_scale, key_start, offs_n,
    offs_d, lo, hi, T, seed, bh, threshold, keep_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, EVEN_T: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block (BLOCK_N keys) over the query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt_ptrs = q_base + offs_m[None, :] * stride_qt + offs_d[:, None]  # (D, BLOCK_M): Q^T
        o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]  # (BLOCK_M, D)
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]  # (BLOCK_M, D)
        qt = _load(qt_ptrs, offs_m[None, :] < T, 0.0, EVEN_T)
        do = _load(do_ptrs, offs_m[:, None] < T, 0.0, EVEN_T)
        lse = _load(lse_base + offs_m, offs_m < T, float("inf"), EVEN_T)  # padded rows: p = 0
        o = _load(o_ptrs, offs_m[:, None] < T, 0.0, EVEN_T)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
        pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M): P^T before dropout
        if CAUSAL_MASK:
            pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M): gradient of the kept probabilities, transposed
        if DROPOUT:
            keep = _keep(seed, bh, threshold, offs_m, key_start, T, BLOCK_M, BLOCK_N)  # (BLOCK_M, BLOCK_N)
            keep_t = tl.trans(keep.to(tl.int8)) != 0
            dv += tl.dot(tl.where(keep_t, pt * keep_scale, 0.0).to(do.dtype), do)
            dpt = tl.where(keep_t, dpt * keep_scale, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do)
        dst = pt * (dpt - delta[None, :])  # dS^T, gradient of the (scaled) scores
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    return dk, dv


@triton.jit
def _bwd_dkdv(
    Q, K, V, O, DO, LSE, DK, DV, sm_scale, qk_scale, seed, threshold, keep_scale, stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, start_n, off_bhk, H, H_KV, GROUP, T,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of BLOCK_N keys of one (batch, KV head), summed over the GROUP query heads that read them.

    O, dO (B, H, T, D) and dK, dV (B, H_kv, T, D) are contiguous (the launcher makes sure)."""
    b, hk, _ = _batch_heads(off_bhk, H_KV, 1)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = _load(k_ptrs, offs_n[:, None] < T, 0.0, EVEN_T)
    v = _load(v_ptrs, offs_n[:, None] < T, 0.0, EVEN_T)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # queries before the key block see none of it (causal); [lo, lo_unmasked) is the diagonal, masked
    if CAUSAL:
        lo = start_n * BLOCK_N
        lo_unmasked = lo + BLOCK_N
    else:
        lo = 0
        lo_unmasked = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        o_base = O + bh * T * HEAD_DIM
        do_base = DO + bh * T * HEAD_DIM
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, o_base, do_base, LSE + bh * T, stride_qt, HEAD_DIM, HEAD_DIM, qk_scale,
                start_n * BLOCK_N, offs_n, offs_d, lo, lo_unmasked, T, seed, bh, threshold, keep_scale, BLOCK_M,
                BLOCK_N, True, EVEN_T, DROPOUT,
            )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, o_base, do_base, LSE + bh * T, stride_qt, HEAD_DIM, HEAD_DIM, qk_scale, start_n *
            BLOCK_N, offs_n, offs_d, lo_unmasked, T, T, seed, bh, threshold, keep_scale, BLOCK_M, BLOCK_N, False,
            EVEN_T, DROPOUT,
        )  # fmt: skip
    dk *= sm_scale
    offs = (off_bhk.to(tl.int64) * T + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    dk_ptrs = DK + offs
    dv_ptrs = DV + offs
    _store(dk_ptrs, dk.to(DK.dtype.element_ty), offs_n[:, None] < T, EVEN_T)
    _store(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n[:, None] < T, EVEN_T)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qk_scale, offs_m, offs_d, lo, hi, T, seed, bh,
    threshold, keep_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    EVEN_T: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]  # (D, BLOCK_N)
        kt = _load(kt_ptrs, offs_n[None, :] < T, 0.0, EVEN_T)
        vt = _load(vt_ptrs, offs_n[None, :] < T, 0.0, EVEN_T)
        p = tl.math.exp2(tl.dot(q, kt) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N), before dropout
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if not EVEN_T:
            p = tl.where(offs_n[None, :] < T, p, 0.0)
        dp = tl.dot(do, vt)
        if DROPOUT:
            keep = _keep(seed, bh, threshold, offs_m, start_n, T, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    return dq


@triton.jit
def _bwd_dq(
    Q, K, V, O, DO, LSE, DQ, sm_scale, qk_scale, seed, threshold, keep_scale, stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, start_m, off_bh, H, GROUP, T,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of BLOCK_M queries of one (batch, head). O, dO and dQ (B, H, T, D) are contiguous."""
    b, h, hk = _batch_heads(off_bh, H, GROUP)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = off_bh.to(tl.int64) * T + offs_m
    offs = rows[:, None] * HEAD_DIM + offs_d[None, :]  # into the contiguous O, dO, dQ
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = _load(q_ptrs, offs_m[:, None] < T, 0.0, EVEN_T)
    do = _load(DO + offs, offs_m[:, None] < T, 0.0, EVEN_T)
    o = _load(O + offs, offs_m[:, None] < T, 0.0, EVEN_T)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = _load(LSE + rows, offs_m < T, float("inf"), EVEN_T)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # [0, hi_unmasked) needs no causal mask; [hi_unmasked, hi_unmasked + BLOCK_M) is the diagonal
    if CAUSAL:
        hi_unmasked = start_m * BLOCK_M
    else:
        hi_unmasked = T
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qk_scale, offs_m, offs_d, 0, hi_unmasked, T,
        seed, off_bh, threshold, keep_scale, BLOCK_M, BLOCK_N, False, EVEN_T, DROPOUT,
    )  # fmt: skip
    if CAUSAL:
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qk_scale, offs_m, offs_d, hi_unmasked,
            hi_unmasked + BLOCK_M, T, seed, off_bh, threshold, keep_scale, BLOCK_M, BLOCK_N, True, EVEN_T, DROPOUT,
        )  # fmt: skip
    dq *= sm_scale
    _store(DQ + offs, dq.to(DQ.dtype.element_ty), offs_m[:, None] < T, EVEN_T)


@triton.jit
def _attn_bwd(
    Q, K, V, O, DO, LSE, DQ, DK, DV, sm_scale, qk_scale, seed, threshold, keep_scale, stride_qb, stride_qh,
    stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, H, H_KV, GROUP, T, T_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_T: tl.constexpr,
    BLOCK_BIG: tl.constexpr, BLOCK_SMALL: tl.constexpr,
):  # fmt: skip
    """The whole backward in one launch. Grid (cdiv(T, BLOCK_BIG), B * H_kv + B * H): the first B * H_kv rows of
    programs each own BLOCK_BIG keys (dK, dV), the others each own BLOCK_BIG queries (dQ). Causal: the heaviest
    blocks (first keys, last queries) get the lowest program ids, so they start first."""
    if isinstance(seed, tl.tensor):
        if seed.dtype.is_ptr():  # a seed tensor on the device (kernels.compile_ops)
            seed = tl.load(seed)
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n_kv_rows = tl.num_programs(1) // (GROUP + 1)  # B * H_kv
    if row < n_kv_rows:
        _bwd_dkdv(
            Q, K, V, O, DO, LSE, DK, DV, sm_scale, qk_scale, seed, threshold, keep_scale,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
            pid, row, H, H_KV, GROUP, T,
            HEAD_DIM, CAUSAL, DROPOUT, EVEN_T, BLOCK_SMALL, BLOCK_BIG,
        )  # fmt: skip
    else:
        start_m = pid
        if CAUSAL:
            start_m = tl.num_programs(0) - 1 - pid
        _bwd_dq(
            Q, K, V, O, DO, LSE, DQ, sm_scale, qk_scale, seed, threshold, keep_scale,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
            start_m, row - n_kv_rows, H, GROUP, T,
            HEAD_DIM, CAUSAL, DROPOUT, EVEN_T, BLOCK_BIG, BLOCK_SMALL,
        )  # fmt: skip


_attn_bwd_tuned = _autotune(BWD_CONFIGS, _prune("BLOCK_BIG", BWD_MAX_BLOCK_D128))(_attn_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Launchers, autograd, wrapper


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and time strides; the head-dim stride is 1 (the launchers make sure)."""
    strides = t.stride()  # one call: this runs on every launch, where small shapes feel the host time
    assert strides[3] == 1, strides
    return strides[:3]


def _dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _even_t(T: int, cuda: bool) -> bool:
    """Whether T fills whole blocks of every config, so loads, stores and scores need no bounds masks."""
    return T % (EVEN_T_MULTIPLE if cuda else INTERPRET_EVEN_T_MULTIPLE) == 0


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, float]:
    """(seed, threshold, keep_scale): keep where 31 random bits >= round(p * 2**31); kept values times 1 / (1 - p)."""
    return seed, min(round(dropout_p * 2**RNG_BITS), 2**RNG_BITS - 1), 1.0 / (1.0 - dropout_p)


# (kernel, T bucket, dtype, constexprs) -> the config the autotuner chose: later calls launch the plain kernel with
# it, skipping the autotuner's per-call host work (key building, pruning hooks), which lone small calls feel
_TUNED: dict[tuple, triton.Config] = {}


def _launch(
    kernel, tuned, interpret_blocks: dict, along: str, n: int, programs: int, *args, config=None, **meta
) -> None:
    """Grid (cdiv(n, meta[along]), programs): autotuned on a GPU (once per key, then the chosen config directly),
    the interpreter's fixed blocks on CPU, or the given triton.Config (the tests run every config the tuner may
    pick). args[-1] is T_BUCKET, the autotune key's one argument beside the constexprs."""
    if not args[0].is_cuda and config is None:
        kernel[(triton.cdiv(n, interpret_blocks[along]), programs)](*args, **meta, **interpret_blocks)
        return
    key = (kernel, args[-1], args[0].dtype, *meta.items())  # q's dtype is k's, v's and O's; LSE is always fp32
    config = _TUNED.get(key) if config is None else config
    if config is None:
        tuned[lambda m: (triton.cdiv(n, m[along]), programs)](*args, **meta)
        _TUNED[key] = tuned.best_config
    else:
        kernel[(triton.cdiv(n, config.kwargs[along]), programs)](*args, **meta, **config.all_kwargs())


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, dropout_p: float, seed: int,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns O (B, H, T, D) contiguous and the base-2 log-sum-exp of the scaled scores (B, H, T) fp32."""
    B, H, T, D = q.shape
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _launch(
        _attn_fwd,
        _attn_fwd_tuned,
        INTERPRET_FWD_BLOCKS,
        "BLOCK_M",
        T,
        B * H,
        q,
        k,
        v,
        o,
        lse,
        scale * LOG2E,
        *_dropout_args(dropout_p, seed),
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        H,
        H // k.shape[1],
        T,
        triton.next_power_of_2(T),
        HEAD_DIM=D,
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        EVEN_T=_even_t(T, q.is_cuda or config is not None),  # a given config: GPU block sizes
        config=config,
    )
    return o, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (dK and dV summed over the query heads of each KV head), in one launch."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    do = do.contiguous()  # the kernel indexes dO, O and dQ alike: contiguous (B, H, T, D)
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H_kv, T, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H_kv, T, D), dtype=v.dtype, device=v.device)
    _launch(
        _attn_bwd,
        _attn_bwd_tuned,
        INTERPRET_BWD_BLOCKS,
        "BLOCK_BIG",
        T,
        B * H_kv + B * H,
        q,
        k,
        v,
        o,
        do,
        lse,
        dq,
        dk,
        dv,
        scale,
        scale * LOG2E,
        *_dropout_args(dropout_p, seed),
        *_strides(q),
        *_strides(k),
        *_strides(v),
        H,
        H_kv,
        H // H_kv,
        T,
        triton.next_power_of_2(T),
        HEAD_DIM=D,
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        EVEN_T=_even_t(T, q.is_cuda or config is not None),  # a given config: GPU block sizes
        config=config,
    )
    return dq, dk, dv


def _draw_seed() -> int:
    """A dropout seed from torch's default generator (torch.manual_seed makes runs repeat); no device sync."""
    return int(torch.randint(SEED_HIGH, (), dtype=torch.int64))


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves Q, K, V, O, the log-sum-exp and the dropout seed (no (T, T) tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, dropout_p: float = 0.0, seed: int = 0):
        q, k, v = (_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None, None


def dropout_keep_mask(seed: int, B: int, H: int, T: int, dropout_p: float, device: torch.device | str) -> torch.Tensor:
    """The keep mask (B, H, T, T) bool that the kernels apply for this seed and p (query head b * H + h, row, key).

    For tests and debugging: the same `_keep` as the attention kernels, tiled differently (the bits do not depend
    on the tiling). Runs through the interpreter on CPU tensors.
    """
    _check_dropout(dropout_p, T)
    keep = torch.empty((B, H, T, T), dtype=torch.int8, device=device)
    seed, threshold, _ = _dropout_args(dropout_p, seed)
    block_m, block_n = MASK_BLOCKS if keep.is_cuda else INTERPRET_MASK_BLOCKS
    _dropout_mask_kernel[(triton.cdiv(T, block_m), B * H)](keep, seed, threshold, T, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool()


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    dropout_p: float = 0.0, keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(Q K^T * scale (+ causal mask)) V in fp32, KV heads repeated for each query-head group.

    dropout_p > 0 drops probabilities where `keep` (B, H, T, T) is False and scales the rest by 1 / (1 - p); without
    `keep`, torch's own dropout draws the mask.
    """
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        if keep is None:
            probs = torch.nn.functional.dropout(probs, dropout_p)
        else:
            probs = probs * keep / (1.0 - dropout_p)
    return (probs @ v.float()).to(q.dtype)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k and v must be (B={B}, H_kv, T={T}, D={D}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"n_kv_heads={k.shape[1]} must divide n_heads={H}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_dropout(dropout_p: float, T: int) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_p > 0.0 and T > MAX_DROPOUT_T:
        raise ValueError(f"dropout needs T <= {MAX_DROPOUT_T} (unique Philox counters); got T={T}")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    seed: int | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, T, D) -> (B, H, T, D); scale defaults to 1/sqrt(D).

    `dropout_p` drops attention probabilities (as SDPA's dropout_p); the kernel's mask comes from `seed`, drawn from
    torch's generator when None (the reference fallback draws torch's own dropout mask). Triton forward and backward
    on CUDA tensors of a supported head dim and dtype, the PyTorch reference otherwise.
    """
    _check(q, k, v)
    _check_dropout(dropout_p, q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0.0:  # the kernels take the row maximum of the scaled scores as max(scores) * scale
        raise ValueError(f"scale must be > 0; got {scale}")
    supported = q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
    if use_triton(impl, q, k, v, supported=supported):
        if dropout_p > 0.0 and seed is None:
            seed = _draw_seed()
        return FlashAttentionFunction.apply(q, k, v, causal, scale, float(dropout_p), seed or 0)
    return reference(q, k, v, causal, scale, dropout_p)
