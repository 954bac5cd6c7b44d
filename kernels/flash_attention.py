"""Flash attention (FlashAttention-2) forward and backward in Triton: causal or not, grouped KV heads (GQA).

Scores never reach memory: each program streams K/V blocks past a block of queries with an online softmax
(forward), keeping only the per-row log-sum-exp for the backward, which recomputes the probabilities. The backward
is two kernels, as in the Triton fused-attention tutorial: one owns a block of keys and accumulates dK, dV over
all queries (and over the query heads that share the KV head), the other owns a block of queries and accumulates
dQ. Causal runs split each loop into the blocks wholly below the diagonal (no mask) and the diagonal blocks (masked).

T_BUCKET, an argument of each kernel that the kernel never reads, is next_power_of_2(T): the autotune key.

Shapes: q (B, H, T, D), k and v (B, H_kv, T, D) with H % H_kv == 0; D in {16, 32, 64, 128}; fp16, bf16 or fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
import triton.testing

from kernels.dispatch import Impl, use_triton

__all__ = ["FlashAttentionFunction", "flash_attention", "reference", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the fast hardware path

# Fixed blocks for the CPU interpreter (no autotuning there): small, and unequal so that the causal diagonal
# split (BLOCK_M a multiple of BLOCK_N in the forward and dQ, the reverse in dK/dV) is exercised by the tests.
INTERPRET_FWD_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16)
INTERPRET_DKDV_BLOCKS = dict(BLOCK_M=16, BLOCK_N=32)
INTERPRET_DQ_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16)
PREPROCESS_BLOCK_M = 64  # rows per program of delta = rowsum(O * dO)
INTERPRET_PREPROCESS_BLOCK_M = 16


def _configs(entries: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_stages, num_warps) -> autotune configs."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w) for bm, bn, s, w in entries]


# A few configs each (compiling is most of the tuning time), picked from sm_90 builds: at D=64 none spills
# registers, and at D=128 each kernel keeps spill-free choices (sm90_compile_test.py builds them without a GPU).
# The forward and dQ loop over key blocks inside a query block (BLOCK_M % BLOCK_N == 0); dK/dV the reverse.
FWD_CONFIGS = _configs(
    [(64, 64, 4, 4), (64, 32, 4, 4), (128, 32, 4, 4), (128, 64, 3, 4), (128, 64, 3, 8), (128, 128, 3, 8)]
)
DQ_CONFIGS = _configs([(64, 32, 4, 4), (64, 64, 3, 4), (128, 32, 3, 4), (128, 32, 2, 8), (128, 64, 2, 8)])
DKDV_CONFIGS = _configs([(32, 32, 3, 4), (32, 64, 4, 4), (32, 64, 2, 8), (32, 128, 2, 8), (64, 128, 2, 8)])
# T enters the key rounded up to a power of two, so varying prompt lengths do not each trigger a tuning run.
AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL"]
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25


def _autotune_bench(kernel_call, quantiles):
    """Shorter timing windows than Triton's default (25/100 ms): the configs differ by far more than the noise."""
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _autotune(configs: list[triton.Config]):
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY, do_bench=_autotune_bench)


def _even_t(args: dict) -> bool:
    """Whether T fills whole blocks, so loads, stores and scores need no bounds masks."""
    return args["T"] % args["BLOCK_M"] == 0 and args["T"] % args["BLOCK_N"] == 0


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


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    qk_scale,
    offs_m,
    offs_d,
    lo,
    hi,
    T,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """Online softmax of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N): K^T
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
        kt = _load(kt_ptrs, offs_n[None, :] < T, 0.0, EVEN_T)
        qk = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N), scores in log2 units
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if not EVEN_T:
            qk = tl.where(offs_n[None, :] < T, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_ptrs, offs_n[:, None] < T, 0.0, EVEN_T)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.heuristics({"EVEN_T": _even_t})
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    H,
    GROUP,
    T,
    T_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head). Writes O and the base-2 log-sum-exp of the scores."""
    start_m = tl.program_id(0)
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
    if CAUSAL:
        diag = start_m * BLOCK_M
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_m,
            offs_d,
            0,
            diag,
            T,
            BLOCK_N,
            False,
            EVEN_T,
        )
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_m,
            offs_d,
            diag,
            diag + BLOCK_M,
            T,
            BLOCK_N,
            True,
            EVEN_T,
        )
    else:
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_m,
            offs_d,
            0,
            T,
            T,
            BLOCK_N,
            False,
            EVEN_T,
        )
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    lse_ptrs = LSE + off_bh.to(tl.int64) * T + offs_m
    _store(lse_ptrs, lse, offs_m < T, EVEN_T)
    _store(o_ptrs, acc.to(O.dtype.element_ty), offs_m[:, None] < T, EVEN_T)


_attn_fwd_tuned = _autotune(FWD_CONFIGS)(_attn_fwd)


# ----------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_preprocess(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    H,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(O * dO), the softmax-backward term shared by every key of a row. O and dO share strides."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b, h, _ = _batch_heads(off_bh, H, 1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    mask = offs_m[:, None] < T
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_dot,
    qk_scale,
    offs_n,
    offs_d,
    lo,
    hi,
    T,
    BLOCK_M: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt_ptrs = q_base + offs_m[None, :] * stride_qt + offs_d[:, None]  # (D, BLOCK_M): Q^T
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]  # (BLOCK_M, D)
        qt = _load(qt_ptrs, offs_m[None, :] < T, 0.0, EVEN_T)
        do = _load(do_ptrs, offs_m[:, None] < T, 0.0, EVEN_T)
        lse = _load(lse_base + offs_m, offs_m < T, float("inf"), EVEN_T)  # padded rows: p = 0
        delta = _load(delta_base + offs_m, offs_m < T, 0.0, EVEN_T)
        pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M): P^T
        if CAUSAL_MASK:
            pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M): dP^T
        dst = pt * (dpt - delta[None, :])  # dS^T, gradient of the (scaled) scores
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    return dk, dv


@triton.heuristics({"EVEN_T": _even_t})
@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    sm_scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    H,
    H_KV,
    GROUP,
    T,
    T_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, KV head); sums over the GROUP query heads that read them."""
    start_n = tl.program_id(0)
    off_bhk = tl.program_id(1)
    b, hk, _ = _batch_heads(off_bhk, H_KV, 1)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = _load(k_ptrs, offs_n[:, None] < T, 0.0, EVEN_T)
    v = _load(v_ptrs, offs_n[:, None] < T, 0.0, EVEN_T)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        stats = (b * H + h) * T
        if CAUSAL:
            diag = start_n * BLOCK_N  # queries before the key block see none of it
            dk, dv = _bwd_dkdv_inner(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                LSE + stats,
                DELTA + stats,
                stride_qt,
                stride_dot,
                qk_scale,
                offs_n,
                offs_d,
                diag,
                diag + BLOCK_N,
                T,
                BLOCK_M,
                True,
                EVEN_T,
            )
            dk, dv = _bwd_dkdv_inner(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                LSE + stats,
                DELTA + stats,
                stride_qt,
                stride_dot,
                qk_scale,
                offs_n,
                offs_d,
                diag + BLOCK_N,
                T,
                T,
                BLOCK_M,
                False,
                EVEN_T,
            )
        else:
            dk, dv = _bwd_dkdv_inner(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                LSE + stats,
                DELTA + stats,
                stride_qt,
                stride_dot,
                qk_scale,
                offs_n,
                offs_d,
                0,
                T,
                T,
                BLOCK_M,
                False,
                EVEN_T,
            )
    dk *= sm_scale
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    _store(dk_ptrs, dk.to(DK.dtype.element_ty), offs_n[:, None] < T, EVEN_T)
    _store(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n[:, None] < T, EVEN_T)


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    qk_scale,
    offs_m,
    offs_d,
    lo,
    hi,
    T,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """Accumulate dQ of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]  # (D, BLOCK_N)
        kt = _load(kt_ptrs, offs_n[None, :] < T, 0.0, EVEN_T)
        vt = _load(vt_ptrs, offs_n[None, :] < T, 0.0, EVEN_T)
        p = tl.math.exp2(tl.dot(q, kt) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if not EVEN_T:
            p = tl.where(offs_n[None, :] < T, p, 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    return dq


@triton.heuristics({"EVEN_T": _even_t})
@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    sm_scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    H,
    GROUP,
    T,
    T_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries of one (batch, head)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b, h, hk = _batch_heads(off_bh, H, GROUP)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    stats = off_bh.to(tl.int64) * T + offs_m
    q = _load(q_ptrs, offs_m[:, None] < T, 0.0, EVEN_T)
    do = _load(do_ptrs, offs_m[:, None] < T, 0.0, EVEN_T)
    lse = _load(LSE + stats, offs_m < T, float("inf"), EVEN_T)
    delta = _load(DELTA + stats, offs_m < T, 0.0, EVEN_T)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        diag = start_m * BLOCK_M
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_m,
            offs_d,
            0,
            diag,
            T,
            BLOCK_N,
            False,
            EVEN_T,
        )
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_m,
            offs_d,
            diag,
            diag + BLOCK_M,
            T,
            BLOCK_N,
            True,
            EVEN_T,
        )
    else:
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            qk_scale,
            offs_m,
            offs_d,
            0,
            T,
            T,
            BLOCK_N,
            False,
            EVEN_T,
        )
    dq *= sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    _store(dq_ptrs, dq.to(DQ.dtype.element_ty), offs_m[:, None] < T, EVEN_T)


_attn_bwd_dkdv_tuned = _autotune(DKDV_CONFIGS)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = _autotune(DQ_CONFIGS)(_attn_bwd_dq)


# ----------------------------------------------------------------------------------------------------------------
# Launchers, autograd, wrapper


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and time strides; the head-dim stride is 1 (the launchers make sure)."""
    assert t.stride(-1) == 1, t.stride()
    return t.stride(0), t.stride(1), t.stride(2)


def _dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(kernel, tuned, interpret_blocks: dict, along: str, n: int, programs: int, *args, **meta) -> None:
    """Grid (cdiv(n, meta[along]), programs): autotuned on a GPU, the interpreter's fixed blocks on CPU."""
    if args[0].is_cuda:
        tuned[lambda m: (triton.cdiv(n, m[along]), programs)](*args, **meta)
    else:
        kernel[(triton.cdiv(n, interpret_blocks[along]), programs)](*args, **meta, **interpret_blocks)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns O (B, H, T, D) and the base-2 log-sum-exp of the scaled scores (B, H, T) fp32."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
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
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        H,
        group,
        T,
        triton.next_power_of_2(T),
        HEAD_DIM=D,
        CAUSAL=causal,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (dK and dV summed over the query heads of each KV head)."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    group = H // H_kv
    do = do.contiguous()  # same strides as o, which _forward allocated contiguous
    delta = torch.empty_like(lse)
    pre_block = PREPROCESS_BLOCK_M if q.is_cuda else INTERPRET_PREPROCESS_BLOCK_M
    _bwd_preprocess[(triton.cdiv(T, pre_block), B * H)](o, do, delta, *_strides(o), H, T, HEAD_DIM=D, BLOCK_M=pre_block)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = scale * LOG2E
    t_bucket = triton.next_power_of_2(T)  # autotune key only
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    _launch(
        _attn_bwd_dkdv,
        _attn_bwd_dkdv_tuned,
        INTERPRET_DKDV_BLOCKS,
        "BLOCK_N",
        T,
        B * H_kv,
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        scale,
        qk_scale,
        *common,
        *_strides(dk),
        *_strides(dv),
        H,
        H_kv,
        group,
        T,
        t_bucket,
        HEAD_DIM=D,
        CAUSAL=causal,
    )
    _launch(
        _attn_bwd_dq,
        _attn_bwd_dq_tuned,
        INTERPRET_DQ_BLOCKS,
        "BLOCK_M",
        T,
        B * H,
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        scale,
        qk_scale,
        *common,
        *_strides(dq),
        H,
        group,
        T,
        t_bucket,
        HEAD_DIM=D,
        CAUSAL=causal,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd for the Triton kernels; saves Q, K, V, O and the log-sum-exp (no (T, T) tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        q, k, v = (_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """softmax(Q K^T * scale (+ causal mask)) V in fp32, KV heads repeated for each query-head group."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


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


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, T, D) -> (B, H, T, D); scale defaults to 1/sqrt(D).

    Triton forward and backward on CUDA tensors of a supported head dim and dtype, the PyTorch reference otherwise.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    supported = q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
    if use_triton(impl, q, k, v, supported=supported):
        return FlashAttentionFunction.apply(q, k, v, causal, scale)
    return reference(q, k, v, causal, scale)
