"""Flash attention (FlashAttention-2) forward and backward in Triton: causal or not, grouped KV heads (GQA), and
attention-probability dropout inside the kernels.

Scores never reach memory: each forward program streams K/V blocks past a block of queries with an online softmax,
keeping only the per-row log-sum-exp (LSE, taken before dropout, as FlashAttention does) for the backward, which
recomputes the probabilities. The backward comes two ways, and on a GPU the first backward of each (T bucket, dtype,
head dim, causal, dropout) times both inside CUDA graphs and keeps the faster:
- dQ by its own programs, ONE launch (the Triton fused-attention tutorial's design): a program either owns a block of
  keys and accumulates dK, dV over every query (and every query head sharing its KV head), or owns a block of queries
  and accumulates dQ, recomputing the scores (and the dropout mask) a second time. delta = rowsum(dO * O), the
  softmax-backward term, is computed in place from the O and dO tiles the programs load.
- dQ by atomics (FlashAttention-2's design): a preprocess launch writes delta and zeroes an fp32 dQ accumulator; the
  key programs alone then add each tile's dS K into it (5 matmuls and one keep mask per tile instead of 7 and two),
  and dQ is cast to the inputs' dtype. Not used under torch's deterministic algorithms (the add order varies).
Causal loops run the blocks wholly below the diagonal without a mask and only the diagonal blocks masked; the grids
hand every head's heaviest causal blocks out first.

Dropout (probability p) keeps a probability with chance 1 - p and scales it by 1 / (1 - p), as SDPA's dropout does
(p to 16 bits, below).
The keep mask is never stored: Philox (counter-based) turns (seed, query head, query row, key column) into the same
bits in the forward and the backward. One Philox call gives four 32-bit words, eight 16-bit halves, one per key for
eight adjacent keys: the keep test of a key compares its 16 bits with round(p * 2**16), so the drop probability is p
to within 2**-17 and kept values are scaled by the exact 1 / P(keep) (E[output] is the undropped attention). Philox is
the kernels' main cost under dropout (ten rounds of 32-bit multiplies per call), so 16 bits per key, not 32, halve it.

Shapes: q (B, H, T, D), k and v (B, H_kv, T, D) with H % H_kv == 0; D in {16, 32, 64, 128}; fp16, bf16 or fp32.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the fast hardware path
RNG_BITS = 16  # the keep test compares 16 random bits with round(p * 2**16); one Philox call serves 8 keys
MAX_DROPOUT_T = 65536  # Philox counters (row * cdiv(T, 8) + key // 8) stay unique below 2**32 up to here
SEED_HIGH = 2**31 - 1  # dropout seeds are drawn from torch's generator in [0, SEED_HIGH)

# Fixed blocks for the CPU interpreter (no autotuning there): small, and unequal so that the causal diagonal split
# (BLOCK_M a multiple of BLOCK_N in the forward; BLOCK_BIG a multiple of BLOCK_SMALL in the backward) is exercised.
INTERPRET_FWD_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16)
INTERPRET_BWD_BLOCKS = dict(BLOCK_BIG=32, BLOCK_SMALL=16)
# rows per program of the atomic backward's preprocess (they divide the EVEN_T multiples)
PRE_BLOCK, INTERPRET_PRE_BLOCK = 64, 32
# Every block of every config divides this, so T % EVEN_T_MULTIPLE == 0 means no bounds masks are needed; passed as a
# constexpr from the host (no @triton.heuristics wrapper: one less Python layer in a launch that small shapes feel).
EVEN_T_MULTIPLE = 128
INTERPRET_EVEN_T_MULTIPLE = 32
# rows (heads; in the backward, KV-head or query-head rows) per group of `_tile`'s program order: 16 heads' K, V, Q, O,
# dO at T 1024 are ~10 MB, well inside L2, and 16 x (4-16 blocks) programs are about one wave on 132 SMs
ROW_GROUP = tl.constexpr(16)
MASK_BLOCKS = (64, 64)  # blocks of the debug keep-mask kernel on a GPU
INTERPRET_MASK_BLOCKS = (32, 32)  # and on CPU: a third tiling, beside the forward's and the backward's


def _configs(names: tuple[str, str], entries: list[tuple[int, int, int, int]], **fixed) -> list[triton.Config]:
    """(block, block, num_stages, num_warps) -> autotune configs with the two named block sizes (and `fixed`)."""
    return [triton.Config({names[0]: a, names[1]: b, **fixed}, num_stages=s, num_warps=w) for a, b, s, w in entries]


# Forward: BLOCK_M queries per program, a loop over BLOCK_N keys (BLOCK_M % BLOCK_N == 0 for the causal diagonal).
# From the Triton tutorial's Hopper space (BLOCK_M 64/128, BLOCK_N 32-128, 2-4 stages, 4/8 warps): the sm_90 builds
# at D = 64 that do not spill without dropout (left out: 128/64 at 4 warps, 96 bytes, 344 with dropout; 128/128
# spills 72 with dropout); 128/128 at 4 stages for long T, where the loop is long enough for a deeper pipeline. Few
# configs: each new (head dim, dtype, causal, dropout) compiles them all on its first call.
FWD_CONFIGS = _configs(
    ("BLOCK_M", "BLOCK_N"),
    [(64, 32, 4, 4), (64, 64, 3, 4), (128, 64, 3, 8), (128, 64, 4, 8), (128, 128, 3, 8), (128, 128, 4, 8)],
)
# Backward: a dK/dV program owns BLOCK_BIG keys and loops over queries BLOCK_SMALL at a time; a dQ program owns
# BLOCK_BIG queries and loops over keys BLOCK_SMALL at a time. Built for sm_90 at D = 64 (divisibility hints as a
# real launch has them): 128/32 spills ~300 bytes at 4 warps (the tutorial's choice, kept for the tuner to judge)
# and none at 8; 64/32 and 32/32 spill none; 64/64 and 128/64 spill ~100 bytes; 128/128 would spill far more.
# (Triton 3.7's sm_90 build without the hints: 64/32 at 8 warps is the one that spills nothing with dropout too.)
BWD_CONFIGS = _configs(
    ("BLOCK_BIG", "BLOCK_SMALL"),
    [(128, 32, 2, 8), (128, 32, 3, 8), (128, 32, 3, 4), (128, 64, 2, 8)]
    + [(64, 32, 3, 4), (64, 32, 4, 8), (64, 64, 3, 8), (32, 32, 3, 4)],
    DQ_ATOMIC=False,
)
# Backward with dQ by atomics (FlashAttention-2's way): only dK/dV programs, each owning BLOCK_BIG keys, which also
# add dS K of every query block they visit into an fp32 dQ accumulator. 5 matmuls per tile instead of 4 + 3, one
# Philox pass instead of two, for a preprocess launch (delta, accumulator zeroed) and a conversion of dQ.
# sm_90 builds at D = 64 (Triton 3.7, no hints): none spills without dropout; with it 64/32 spills nothing, 128/32
# ~130 bytes, 64/16 64; 4 warps at 128/32 (500-1400 bytes) and 64/64 blocks (16-600) were left out.
BWD_ATOMIC_CONFIGS = _configs(
    ("BLOCK_BIG", "BLOCK_SMALL"),
    [(128, 32, 3, 8), (128, 32, 2, 8), (64, 32, 3, 8), (64, 32, 4, 8), (64, 16, 3, 4)],
    DQ_ATOMIC=True,
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
        return small or [min(configs, key=lambda c: math.prod(c.kwargs[name] for name in c.kwargs if "BLOCK" in name))]

    return prune


def _autotune(configs: list[triton.Config], prune, reset_to_zero: list[str] | None = None):
    # cache_results: a key's timings go to Triton's cache directory (keyed by the GPU target, the kernel's source, the
    # key and the configs), so a later process of the same machine reuses the pick instead of compiling and timing
    # every config again: the compiled trainer with flash attention spent ~33 s of its first step tuning (H200,
    # 0262b9f), on every launch.
    return triton.autotune(
        configs=configs,
        key=AUTOTUNE_KEY,
        do_bench=_autotune_bench,
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
        cache_results=True,
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
def _tile(n_blocks):
    """(row, block index, rows) of this program in the 1-D grid of rows x n_blocks programs, numbered so that rows go
    ROW_GROUP at a time and, within a group, the block index varies slowest: a group's blocks 0 (the heaviest, as the
    kernels count blocks under causal masking) all start before its blocks 1, and so on, so the grid ends on light
    programs (longest first), while the programs in flight share a few heads' data in L2 (the matmul tutorial's
    grouped ordering)."""
    pid = tl.program_id(0)
    n_rows = tl.num_programs(0) // n_blocks
    per_group = ROW_GROUP * n_blocks
    first_row = (pid // per_group) * ROW_GROUP
    rows_here = tl.minimum(n_rows - first_row, ROW_GROUP)  # the last group may be short
    r = pid % per_group
    return first_row + r % rows_here, r // rows_here, n_rows


@triton.jit
def _keep(seed, bh, threshold, offs_m, start_n, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask (BLOCK_M, BLOCK_N) of query head `bh`, rows offs_m, keys start_n .. start_n + BLOCK_N.

    Element (row, key) takes 16-bit half key % 2 of word (key % 8) // 2 of Philox(seed; counter row * cdiv(T, 8) +
    key // 8, bh): a function of (seed, bh, row, key) only, so any tiling of the forward, the backward or the debug
    mask kernel sees the same bit. start_n is a multiple of 8 (every block is).
    """
    octs = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    c0 = (offs_m[:, None] * ((T + 7) // 8) + octs[None, :]).to(tl.uint32)  # (BLOCK_M, BLOCK_N // 8)
    c1 = (c0 * 0 + bh).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c1 * 0, c1 * 0)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (BLOCK_M, BLOCK_N // 8, 2, 2): word 2a + b at [..., a, b]
    halves = tl.join(words & 0xFFFF, words >> 16)  # (..., 2, 2, 2): half c of word 2a + b at [..., a, b, c]
    halves = tl.reshape(halves, (BLOCK_M, BLOCK_N))  # key 8q + 2w + c holds half c of word w of oct q
    return halves.to(tl.int32) >= threshold


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

    Grid B * H * cdiv(T, BLOCK_M) in `_tile`'s order; causal, block 0 is the last query block (the most work).
    """
    if isinstance(seed, tl.tensor):  # (an int seed of 1 arrives as a constexpr)
        if seed.dtype.is_ptr():  # a seed tensor on the device (kernels.compile_ops: fresh in every CUDA-graph replay)
            seed = tl.load(seed)
    n_blocks = tl.cdiv(T, BLOCK_M)
    off_bh, start_m, _ = _tile(n_blocks)
    if CAUSAL:
        start_m = n_blocks - 1 - start_m
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
# The keep mask of a tile is drawn once and serves dV and dP; with DQ_ATOMIC it serves dQ too (dS of the same tile).


@triton.jit
def _bwd_preprocess(O, DO, DELTA, DQ_ACC, T, HEAD_DIM: tl.constexpr, EVEN_T: tl.constexpr, BLOCK: tl.constexpr):
    """For the DQ_ATOMIC backward: delta = rowsum(dO * O) of BLOCK rows of one (batch, head), and their fp32 dQ
    accumulator zeroed. Grid (B * H, cdiv(T, BLOCK)); O, dO, the accumulator (B, H, T, D) contiguous."""
    offs_m = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = tl.program_id(0).to(tl.int64) * T + offs_m
    offs = rows[:, None] * HEAD_DIM + offs_d[None, :]
    o = _load(O + offs, offs_m[:, None] < T, 0.0, EVEN_T)
    do = _load(DO + offs, offs_m[:, None] < T, 0.0, EVEN_T)
    _store(DELTA + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), offs_m < T, EVEN_T)
    _store(DQ_ACC + offs, tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32), offs_m[:, None] < T, EVEN_T)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, o_base, do_base, lse_base, delta_base, dq_base, stride_qt, sm_scale, qk_scale, key_start,
    offs_n, offs_d, lo, hi, T, seed, bh, threshold, keep_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, EVEN_T: tl.constexpr, DROPOUT: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block (BLOCK_N keys) over the query blocks [lo, hi) of one query head; with
    DQ_ATOMIC also add each query block's dQ share (dS K * scale) into the fp32 accumulator at dq_base.

    O, dO and the dQ accumulator of the head are contiguous (T, D) at o_base, do_base, dq_base."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_M, D) into O, dO, dQ
        qt_ptrs = q_base + offs_m[None, :] * stride_qt + offs_d[:, None]  # (D, BLOCK_M): Q^T
        qt = _load(qt_ptrs, offs_m[None, :] < T, 0.0, EVEN_T)
        do = _load(do_base + rows, offs_m[:, None] < T, 0.0, EVEN_T)
        lse = _load(lse_base + offs_m, offs_m < T, float("inf"), EVEN_T)  # padded rows: p = 0
        if DQ_ATOMIC:
            delta = _load(delta_base + offs_m, offs_m < T, 0.0, EVEN_T)  # (BLOCK_M,) from the preprocess
        else:
            o = _load(o_base + rows, offs_m[:, None] < T, 0.0, EVEN_T)
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
        dst = (pt * (dpt - delta[None, :])).to(qt.dtype)  # dS^T, gradient of the (scaled) scores
        dk += tl.dot(dst, tl.trans(qt))
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(dst), k) * sm_scale  # (BLOCK_M, D); padded keys have k = 0
            if EVEN_T:
                tl.atomic_add(dq_base + rows, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_base + rows, dq, mask=offs_m[:, None] < T, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, sm_scale, qk_scale, seed, threshold, keep_scale, stride_qb, stride_qh,
    stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, start_n, off_bhk, H, H_KV, GROUP, T,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQ_ATOMIC: tl.constexpr,
):  # fmt: skip
    """dK, dV of BLOCK_N keys of one (batch, KV head), summed over the GROUP query heads that read them (and, with
    DQ_ATOMIC, those heads' dQ shares added into the accumulator DQ).

    O, dO, DQ (B, H, T, D) and dK, dV (B, H_kv, T, D) are contiguous (the launcher makes sure)."""
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
        dq_base = DQ + bh * T * HEAD_DIM
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, o_base, do_base, LSE + bh * T, DELTA + bh * T, dq_base, stride_qt, sm_scale,
                qk_scale, start_n * BLOCK_N, offs_n, offs_d, lo, lo_unmasked, T, seed, bh, threshold, keep_scale,
                HEAD_DIM, BLOCK_M, BLOCK_N, True, EVEN_T, DROPOUT, DQ_ATOMIC,
            )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, o_base, do_base, LSE + bh * T, DELTA + bh * T, dq_base, stride_qt, sm_scale,
            qk_scale, start_n * BLOCK_N, offs_n, offs_d, lo_unmasked, T, T, seed, bh, threshold, keep_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, False, EVEN_T, DROPOUT, DQ_ATOMIC,
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
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, sm_scale, qk_scale, seed, threshold, keep_scale, stride_qb, stride_qh,
    stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, H, H_KV, GROUP, T, T_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_T: tl.constexpr,
    BLOCK_BIG: tl.constexpr, BLOCK_SMALL: tl.constexpr, DQ_ATOMIC: tl.constexpr,
):  # fmt: skip
    """The backward's main launch, grid rows * cdiv(T, BLOCK_BIG) in `_tile`'s order. The first B * H_kv rows of
    programs each own BLOCK_BIG keys (dK, dV). Without DQ_ATOMIC, B * H more rows each own BLOCK_BIG queries and
    write their dQ (DQ in the inputs' dtype; DELTA unused); with it there are no such rows: the key programs add dQ
    into DQ (fp32, zeroed) and read delta from DELTA. Causal, block 0 is the heaviest (first keys, last queries)."""
    if isinstance(seed, tl.tensor):
        if seed.dtype.is_ptr():  # a seed tensor on the device (kernels.compile_ops)
            seed = tl.load(seed)
    n_blocks = tl.cdiv(T, BLOCK_BIG)
    row, pid, n_rows = _tile(n_blocks)
    if DQ_ATOMIC:
        n_kv_rows = n_rows
    else:
        n_kv_rows = n_rows // (GROUP + 1)  # B * H_kv
    if row < n_kv_rows:
        _bwd_dkdv(
            Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, sm_scale, qk_scale, seed, threshold, keep_scale,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
            pid, row, H, H_KV, GROUP, T,
            HEAD_DIM, CAUSAL, DROPOUT, EVEN_T, BLOCK_SMALL, BLOCK_BIG, DQ_ATOMIC,
        )  # fmt: skip
    else:
        start_m = pid
        if CAUSAL:
            start_m = n_blocks - 1 - pid
        _bwd_dq(
            Q, K, V, O, DO, LSE, DQ, sm_scale, qk_scale, seed, threshold, keep_scale,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
            start_m, row - n_kv_rows, H, GROUP, T,
            HEAD_DIM, CAUSAL, DROPOUT, EVEN_T, BLOCK_BIG, BLOCK_SMALL,
        )  # fmt: skip


_attn_bwd_tuned = _autotune(BWD_CONFIGS, _prune("BLOCK_BIG", BWD_MAX_BLOCK_D128))(_attn_bwd)
# the tuner's runs add into DQ: it is zeroed before each and before the real run (the preprocess zeroes it first)
_attn_bwd_atomic_tuned = _autotune(BWD_ATOMIC_CONFIGS, _prune("BLOCK_BIG", BWD_MAX_BLOCK_D128), ["DQ"])(_attn_bwd)


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
    """(seed, threshold, keep_scale): keep where 16 random bits >= threshold = round(p * 2**16), so P(keep) is
    (2**16 - threshold) / 2**16, within 2**-17 of 1 - p; kept values times 1 / P(keep), exactly unbiased."""
    threshold = min(round(dropout_p * 2**RNG_BITS), 2**RNG_BITS - 1)
    return seed, threshold, 2**RNG_BITS / (2**RNG_BITS - threshold)


# (autotuner, T bucket, dtype, constexprs) -> the config that autotuner chose: later calls launch the plain kernel with
# it, skipping the autotuner's per-call host work (key building, pruning hooks), which lone small calls feel
_TUNED: dict[tuple, triton.Config] = {}


def _launch(
    kernel, tuned, interpret_blocks: dict, along: str, n: int, programs: int, *args, config=None, **meta
) -> None:
    """Grid programs * cdiv(n, meta[along]) (`_tile` numbers them): autotuned by `tuned` on a GPU (once per key,
    then the chosen config directly), the interpreter's fixed blocks on CPU, or the given triton.Config (the tests run
    every config the tuner may pick). args[-1] is T_BUCKET, the autotune key's one argument beside the constexprs."""
    if not args[0].is_cuda and config is None:
        kernel[(programs * triton.cdiv(n, interpret_blocks[along]),)](*args, **meta, **interpret_blocks)
        return
    key = (tuned, args[-1], args[0].dtype, *meta.items())  # q's dtype is k's, v's and O's; LSE is always fp32
    config = _TUNED.get(key) if config is None else config
    if config is None:
        tuned[lambda m: (programs * triton.cdiv(n, m[along]),)](*args, **meta)
        _TUNED[key] = tuned.best_config
    else:
        kernel[(programs * triton.cdiv(n, config.kwargs[along]),)](*args, **meta, **config.all_kwargs())


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
    """dQ, dK, dV (dK and dV summed over the query heads of each KV head).

    dQ by its own programs in the one launch, or by atomics (preprocess, main launch, dQ cast): as `config` says
    (its DQ_ATOMIC), by atomics in the interpreter, and on a GPU its own programs, or with DQ_ATOMIC_TIMING whichever
    ran faster inside a CUDA graph the first time this (T bucket, dtype, head dim, causal, dropout) came (its own
    programs under deterministic algorithms).
    """
    if config is not None:
        atomic = config.kwargs["DQ_ATOMIC"]
    elif not q.is_cuda:
        atomic = True
    else:
        key = (triton.next_power_of_2(q.shape[2]), q.dtype, q.shape[3], causal, dropout_p > 0.0)
        args = (do, q, k, v, o, lse, causal, scale, dropout_p, seed)
        atomic = _pick_dq_atomic(key, lambda atomic: _backward_by(atomic, *args))
    return _backward_by(atomic, do, q, k, v, o, lse, causal, scale, dropout_p, seed, config)


# (T bucket, dtype, head dim, causal, dropout) -> whether dQ by atomics was the faster backward there
_DQ_ATOMIC: dict[tuple, bool] = {}
# Whether a GPU backward times both dQ ways on its key's first call (else: its own programs, no timing). Off: on the
# H200 (a237bfa, kernels-nvidia-h200-flash-add-wo-matmul.*) atomics lost at every training key (T256 0.0896 vs 0.0690
# ms, T1024 0.3719 vs 0.2981; with dropout 0.1294 vs 0.1089, 0.5707 vs 0.5296), and the timing compiles and tunes the
# atomic kernels in the first step of a run (the compiled trainer's warm-up: part of 69 s before tinylm-kernels'
# first step, b77aa42). The atomic way stays a config (`DQ_ATOMIC`) and this switch, for other GPUs and shapes.
DQ_ATOMIC_TIMING = False
DQ_STRATEGY_REP_MS = 20  # CUDA-graph timing window per strategy, on the first backward of a key


def _pick_dq_atomic(key: tuple, run) -> bool:
    """Whether `run(atomic)` (a whole backward) is faster with atomic dQ, timed once per key as the compiled trainer
    runs it, in a CUDA graph (device time, no host launch cost); never atomics under deterministic algorithms (they
    add in a varying order), and the separate dQ inside a capture that comes before the first timing."""
    if not DQ_ATOMIC_TIMING or torch.are_deterministic_algorithms_enabled():
        return False
    if key not in _DQ_ATOMIC:
        if torch.cuda.is_current_stream_capturing():
            return False
        run(False), run(True)  # each strategy's kernel tuned (and compiled) before the timing
        torch.cuda.synchronize()  # the timing runs on a stream of its own, which must see the inputs written
        ms = {a: _graph_ms(lambda a=a: run(a)) for a in (False, True)}
        _DQ_ATOMIC[key] = ms[True] < ms[False]
        log.info(
            "flash attention backward %s: dQ by atomics %.4f ms, by own programs %.4f ms", key, ms[True], ms[False]
        )
    return _DQ_ATOMIC[key]


def _graph_ms(fn) -> float:
    """Milliseconds per call of `fn` replayed in a CUDA graph; where a graph cannot be captured here (e.g. under
    another graph tool's memory-pool context), the same with plain launches (host cost hidden by the queue)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=DQ_STRATEGY_REP_MS)
    except RuntimeError as err:
        log.warning("flash attention: CUDA-graph timing failed (%s); timing plain launches", err)
        return triton.testing.do_bench(fn, warmup=AUTOTUNE_WARMUP_MS, rep=DQ_STRATEGY_REP_MS)


def _backward_by(
    atomic: bool, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, causal: bool, scale: float, dropout_p: float, seed: int, config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The backward with dQ by atomics (`atomic`) or by its own programs."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    gpu_blocks = q.is_cuda or config is not None  # a given config: GPU block sizes
    even_t = _even_t(T, gpu_blocks)
    do = do.contiguous()  # the kernels index dO, O and dQ alike: contiguous (B, H, T, D)
    dk = torch.empty((B, H_kv, T, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H_kv, T, D), dtype=v.dtype, device=v.device)
    if atomic:
        dq = torch.empty((B, H, T, D), dtype=torch.float32, device=q.device)  # the accumulator, zeroed here:
        delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        block = PRE_BLOCK if gpu_blocks else INTERPRET_PRE_BLOCK
        _bwd_preprocess[(B * H, triton.cdiv(T, block))](o, do, delta, dq, T, HEAD_DIM=D, EVEN_T=even_t, BLOCK=block)
    else:
        dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        delta = lse  # not read: the dK/dV programs take delta from their O and dO tiles
    _launch(
        _attn_bwd,
        _attn_bwd_atomic_tuned if atomic else _attn_bwd_tuned,
        dict(INTERPRET_BWD_BLOCKS, DQ_ATOMIC=atomic),
        "BLOCK_BIG",
        T,
        B * H_kv if atomic else B * H_kv + B * H,
        q,
        k,
        v,
        o,
        do,
        lse,
        delta,
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
        EVEN_T=even_t,
        config=config,
    )
    return dq.to(q.dtype), dk, dv


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


def _checked_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: 1/sqrt(D) by default; must be > 0 (the kernels take the row maximum of the scaled scores
    as max(scores) * scale)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0.0:
        raise ValueError(f"scale must be > 0; got {scale}")
    return scale


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
    scale = _checked_scale(q, scale)
    supported = q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
    if use_triton(impl, q, k, v, supported=supported):
        if dropout_p > 0.0 and seed is None:
            seed = _draw_seed()
        return FlashAttentionFunction.apply(q, k, v, causal, scale, float(dropout_p), seed or 0)
    return reference(q, k, v, causal, scale, dropout_p)
