"""Weight-only quantized matmul for decoding: y = x @ dequant(w).T with INT8 or INT4 weights.

At decode time M (tokens in flight) is small (1..16) and a linear layer is bound by reading its weight, so storing
it in 8 or 4 bits reads 2x or 4x fewer bytes than bf16. One Triton kernel serves both formats (gpt-fast / GemLite
style GEMV): each program owns BLOCK_N output channels and streams their whole rows of the packed weight, K
contiguous (the layout of `kernels/quant_format.py`, row-major (N, K) or (N, K // 2)), with wide loads; it
dequantises in registers and accumulates in fp32. The full-precision weight never exists in memory.

Inner products, chosen by the autotuner per (M bucket, N, K, format):
- "FMA": acc (BM, BN, BK) += x (BM, 1, BK) * w (1, BN, BK), reduced over K once after the loop: no tensor cores, no
  padding of M. Right at small M, where a 16-row `tl.dot` would mostly multiply padding.
  With 4-byte aligned rows (the usual case) the weight is read as int32 words, 4 INT8 or 8 INT4 weights each,
  unpacked with shifts (gpt-fast / GemLite style), the accumulator (BM, BN, words) in the words' layout. Reading
  bytes and widening them into an fp32 accumulator made the compiler copy each weight tile through shared memory
  with barriers every step (seen in the sm_90 PTX); the word loop moves no weight through shared memory.
- "dot": `tl.dot` with a 16..64-row M tile, from M 2 up (the autotuner weighs it against FMA), where FMA would become compute-bound.

No split-K: with BLOCK_N down to 2..8 rows per program, even N = 256..768 gives one or more programs per SM, and a
second reduction kernel (or a memset for atomics) would cost more inside a CUDA graph than it saves. One launch per
call, no host sync, no allocation but the output: the kernel can be captured in a CUDA graph (after a first,
autotuning call outside the capture).

Per kernel:
    int8_matmul_reference / int4_matmul_reference   dequantise-then-matmul in PyTorch (the truth)
    int8_matmul_triton    / int4_matmul_triton      the fused Triton kernel (any M; meant for M <= 16)
    int8_matmul           / int4_matmul             wrappers, x (..., K); impl="auto" (Triton for CUDA
                                                    inputs with M <= MAX_FUSED_M, the reference otherwise: CPU,
                                                    or prefill-sized M where dequantise + cuBLAS wins),
                                                    "triton" or "reference" (kernels/dispatch.py)

Targets (kernels/inference_bench.py, timed inside a CUDA graph beside cuBLAS bf16 `F.linear` captured the same way,
weights cold in L2): at least bf16 at every linear width of the `large` and `gpt2-124m` presets for M = 1..16; at the
lm_head (768 -> 50304, M = 1) INT8 >= 1.2x and INT4 >= 1.5x bf16, >= 60% of copy bandwidth on the weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.dispatch import Impl, use_triton
from kernels.quant_format import check_group_size, unpack_int4, unpack_int8

__all__ = [
    "MAX_FUSED_M",
    "WoConfig",
    "dot_args",
    "int8_matmul",
    "int8_matmul_reference",
    "int8_matmul_triton",
    "int4_matmul",
    "int4_matmul_reference",
    "int4_matmul_triton",
]

MAX_FUSED_M = 64  # above this the wrappers dequantise and call cuBLAS
MAX_FMA_M = 16  # the FMA path's M tile is the whole M bucket: beyond this only the dot path is offered
FMA_REGISTER_BUDGET = 64  # fp32 accumulator elements per thread of the FMA path (fma_tile_elements)
# per config: do_bench_cudagraph replays a graph of about rep / (lone-call ms) calls 10 times. 3 ms (was 10) is still
# 100+ calls per replay, and an autotuning pass (up to 15 configs per shape, M bucket and format) takes ~0.5 s, not ~1.5
AUTOTUNE_REP_MS = 3


@dataclass(frozen=True)
class WoConfig:
    """One launch configuration: BLOCK_N output channels per program, BLOCK_K inputs per step, FMA or dot."""

    block_n: int
    block_k: int
    use_dot: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def block_m(self, m: int) -> int:
        """The M tile: the whole M bucket for FMA, 16..64 rows for dot (its minimum is 16)."""
        bucket = triton.next_power_of_2(max(m, 1))
        return max(16, min(bucket, 64)) if self.use_dot else bucket


# Interpreter (CPU tests) default: small tiles, FMA (BLOCK_K raised to the INT4 group size where smaller).
INTERPRET_CONFIG = WoConfig(block_n=8, block_k=64)

# (BLOCK_N, BLOCK_K, num_warps, num_stages): rows of 128..1024 contiguous bytes per channel per step for INT8. The
# 2- and 4-row tiles keep one program per SM or more at N = 256..768 (and fit M = 8..16 in the register budget).
# All of them compile for sm_90 without spilling at M buckets 1..16 (checked with kernels/sm90_compile_test._build).
_FMA_ENTRIES = (
    (2, 256, 4, 3),
    (2, 512, 8, 2),
    (4, 128, 4, 3),
    (2, 1024, 4, 2),
    (4, 512, 4, 2),
    (4, 1024, 8, 2),
    (8, 256, 4, 3),
    (8, 512, 8, 3),
    (16, 256, 8, 3),
    (32, 128, 4, 4),
)
_DOT_ENTRIES = ((16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 4, 3))


def _triton_config(c: WoConfig, m_bucket: int) -> triton.Config:
    kw = dict(BLOCK_M=c.block_m(m_bucket), BLOCK_N=c.block_n, BLOCK_K=c.block_k, USE_DOT=c.use_dot)
    return triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)


CANDIDATES = tuple(WoConfig(bn, bk, False, w, s) for bn, bk, w, s in _FMA_ENTRIES) + tuple(
    WoConfig(bn, bk, True, w, s) for bn, bk, w, s in _DOT_ENTRIES
)


def fma_tile_elements(m_bucket: int, c: WoConfig, group_size: int, words: bool) -> int:
    """fp32 accumulator elements of the FMA path per program: (BM, BN, BK), or (BM, BN, BK / weights per word) when
    the weight is read as words (4 INT8 or 8 INT4 weights each)."""
    per_word = (4 if group_size == 1 else 8) if words else 1
    return m_bucket * c.block_n * c.block_k // per_word


def candidate_configs(m_bucket: int, k: int, group_size: int, words: bool = False) -> list[WoConfig]:
    """The configs worth timing for an M bucket: FMA only while its accumulator fits the register budget, dot only
    from M 2 on (at M 1 a 16-row tile is all padding); INT4 tiles hold whole groups (BLOCK_K >= group_size).
    group_size 1 means INT8."""
    keep = []
    for c in CANDIDATES:
        if c.block_k < group_size or c.block_k > max(triton.next_power_of_2(k), group_size, 64):
            continue
        if c.use_dot:
            if m_bucket >= 2:
                keep.append(c)
        elif m_bucket <= MAX_FMA_M:
            if fma_tile_elements(m_bucket, c, group_size, words) <= FMA_REGISTER_BUDGET * 32 * c.num_warps:
                keep.append(c)
    return keep or [c for c in CANDIDATES if c.use_dot and c.block_k >= group_size][:1]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune hook: the candidates for this call's M bucket, K, format and load path, with BLOCK_M filled in."""
    m_bucket, group_size = kwargs["M_BUCKET"], kwargs["GROUP_SIZE"]
    found = candidate_configs(m_bucket, named_args["K"], group_size, kwargs["WORDS"])
    return [_triton_config(c, m_bucket) for c in found]


def _autotune_bench(kernel_call, quantiles):
    """Configs are timed inside a CUDA graph, the way decode calls them (lone launches would time the host)."""
    return triton.testing.do_bench_cudagraph(kernel_call, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def dot_args(t: torch.Tensor) -> dict:
    """DOT_DTYPE and DOT_PRECISION constexprs of a kernel's `tl.dot`s for input `t`: t's own dtype on the GPU
    (fp32 exact, no TF32); fp32 under the CPU interpreter, whose bf16 `tl.dot` multiplies the raw uint16 bits
    (triton 3.7.1). Shared with kernels/decode_attention.py."""
    if not t.is_cuda or t.dtype == torch.float32:
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    return dict(DOT_DTYPE=tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float16, DOT_PRECISION="tf32")


@triton.jit
def _mac(acc, x, w, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x (BM, BK) times w (BN, BK). dot: acc (BM, BN), reduced over K here. FMA: acc (BM, BN, BK), reduced once
    after the K loop (`_reduce`): a reduction per step would cost cross-warp shuffles and a barrier every step."""
    if USE_DOT:
        acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    else:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _reduce(acc, USE_DOT: tl.constexpr):
    """The (BM, BN) sums of `_mac`'s accumulator."""
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    return acc


@triton.jit
def _split4(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x (BM, BK) -> the four (BM, BK/4) tensors x[:, 4j + i], i = 0..3."""
    xa, xb = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 4, 2, 2)))  # i = 2a + b: b = 0 / 1, each (BM, BK/4, 2)
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    return x0, x1, x2, x3


@triton.jit
def _int8_words_dot(words, x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN, BK/4) int32 words of 4 int8 weights (byte i = k 4j + i) times x (BM, BK): (BM, BN, BK/4) fp32 partial
    sums (BM == 1: (BN, BK/4))."""
    x0, x1, x2, x3 = _split4(x.to(tl.float32), BLOCK_M, BLOCK_K)
    out = _outer(((words << 24) >> 24).to(tl.float32), x0, BLOCK_M)  # arithmetic shifts sign-extend each byte
    out += _outer(((words << 16) >> 24).to(tl.float32), x1, BLOCK_M)
    out += _outer(((words << 8) >> 24).to(tl.float32), x2, BLOCK_M)
    out += _outer((words >> 24).to(tl.float32), x3, BLOCK_M)
    return out


@triton.jit
def _outer(w, x, BLOCK_M: tl.constexpr):
    """w (BN, W) times x (BM, W) per word: (BN, W) when BM == 1, else (BM, BN, W)."""
    if BLOCK_M == 1:
        out = w * x
    else:
        out = w[None, :, :] * x[:, None, :]
    return out


@triton.jit
def _int4_words_dot(words, x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN, BK/8) int32 words of 8 nibbles (nibble i = k 8j + i, zero point 8) times x (BM, BK): (BM, BN, BK/8) fp32
    partial sums (BM == 1: (BN, BK/8)), before the group scale: sum_i u_i x_i - 8 sum_i x_i."""
    xe, xo = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_K // 2, 2)))  # k = 2h and 2h + 1
    e0, e1, e2, e3 = _split4(xe, BLOCK_M, BLOCK_K // 2)  # nibbles 0, 2, 4, 6 of each word
    o0, o1, o2, o3 = _split4(xo, BLOCK_M, BLOCK_K // 2)  # nibbles 1, 3, 5, 7
    x_sum = e0 + e1 + e2 + e3 + o0 + o1 + o2 + o3  # (BM, BK/8)
    out = _outer((words & 0xF).to(tl.float32), e0, BLOCK_M)
    out += _outer(((words >> 4) & 0xF).to(tl.float32), o0, BLOCK_M)
    out += _outer(((words >> 8) & 0xF).to(tl.float32), e1, BLOCK_M)
    out += _outer(((words >> 12) & 0xF).to(tl.float32), o1, BLOCK_M)
    out += _outer(((words >> 16) & 0xF).to(tl.float32), e2, BLOCK_M)
    out += _outer(((words >> 20) & 0xF).to(tl.float32), o2, BLOCK_M)
    out += _outer(((words >> 24) & 0xF).to(tl.float32), e3, BLOCK_M)
    out += _outer(((words >> 28) & 0xF).to(tl.float32), o3, BLOCK_M)
    return out - 8.0 * _outer(tl.full(words.shape, 1.0, tl.float32), x_sum, BLOCK_M)


@triton.jit
def _wo_gemv_words(
    x_rows, m_mask, w_ptr, scale_ptr, offs_n, n_mask, K, KH, stride_xk, stride_wn, stride_sn, stride_sg,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The FMA path on 32-bit words (4 INT8 or 8 INT4 weights each), unpacked with shifts; the weight tile stays in
    the (BN, words) layout it was loaded in (loading bytes and widening them to an fp32 accumulator of another layout
    made the compiler copy each weight tile through shared memory with two barriers per step). Needs 4-byte aligned
    rows (the wrapper checks). Returns (BM, BN) fp32, scales applied."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    n_words = KH // 4
    rows = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_wn // 4)  # (BN, 1)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
    for kw in range(0, n_words, WORDS):
        offs_w = kw + tl.arange(0, WORDS)
        w_mask = offs_w < n_words
        words = tl.load(rows + offs_w[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)  # (BN, WORDS)
        offs_k = kw * PER_WORD + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        if BITS == 8:
            acc += _int8_words_dot(words, x, BLOCK_M, BLOCK_K)
        else:
            g = offs_w * PER_WORD // GROUP_SIZE  # the group of each word (groups hold whole words)
            s = tl.load(
                scale_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                mask=n_mask[:, None] & w_mask[None, :],
                other=0.0,
            )
            acc += _int4_words_dot(words, x, BLOCK_M, BLOCK_K) * (s if BLOCK_M == 1 else s[None, :, :])
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=1)[None, :]  # (1, BN)
    else:
        out = tl.sum(acc, axis=2)  # (BM, BN)
    if BITS == 8:
        out *= tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
    return out


@triton.jit
def _wo_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,  # x (M, K); w int8 (N, K) or uint8 (N, K // 2); scales fp32 (N,) or (N, K // G); out (M, N)
    M,
    N,
    K,
    KH,  # bytes per weight row: K // 2 for INT4, K for INT8
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_om,
    stride_on,
    M_BUCKET: tl.constexpr,  # next_power_of_2(M): the autotune key (and the FMA path's M tile)
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # INT4 only (1 for INT8)
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    WORDS: tl.constexpr,  # 4-byte aligned weight rows: the FMA path reads words (_wo_gemv_words)
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    if WORDS and not USE_DOT:
        acc = _wo_gemv_words(
            x_ptr + offs_m[:, None] * stride_xm, m_mask, w_ptr, scale_ptr, offs_n, n_mask, K, KH, stride_xk,
            stride_wn, stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        return
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BM, 1)
    w_rows = w_ptr + offs_n[:, None] * stride_wn  # (BN, 1)
    # The accumulator: (BM, BN) for dot; (BM, BN, K elements per step) for FMA (two nibbles share an INT4 byte).
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // (2 if BITS == 4 else 1)), dtype=tl.float32)
    if BITS == 8:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _mac(acc, x, w, USE_DOT, DOT_DTYPE, DOT_PRECISION)  # w (BN, BK) int8, converted in _mac
        acc = _reduce(acc, USE_DOT)
        # The per-channel scale is constant along K: applied once to the integer-weight sums.
        acc *= tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
    else:
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE  # whole groups per K step
        offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the step holds k = 2j (low nibble) and 2j + 1 (high)
        offs_g = tl.arange(0, GROUPS)
        # Loop over packed bytes (kb = k0 / 2): the compiler then sees the byte offsets' alignment and the mask's
        # constancy, and loads the weight in 4..16-byte vectors (with k0 = 2 kb it fell back to one byte per load).
        for kb in range(0, KH, BLOCK_K // 2):
            offs_b = kb + offs_j  # (BK/2,) bytes of this step
            b_mask = offs_b < KH
            b = tl.load(w_rows + offs_b[None, :] * stride_wk, mask=n_mask[:, None] & b_mask[None, :], other=0)
            # (BN, BK/2) uint8
            g = kb // (GROUP_SIZE // 2) + offs_g
            s = tl.load(
                scale_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                mask=n_mask[:, None] & (g < KH // (GROUP_SIZE // 2))[None, :],
                other=0.0,
            )  # (BN, GROUPS)
            # Dequantise in registers: (u - 8) * the scale of the element's group.
            lo = ((b & 0xF).to(tl.int32) - 8).to(tl.float32)
            hi = ((b >> 4).to(tl.int32) - 8).to(tl.float32)
            lo = tl.reshape(tl.reshape(lo, (BLOCK_N, GROUPS, GROUP_SIZE // 2)) * s[:, :, None], (BLOCK_N, BLOCK_K // 2))
            hi = tl.reshape(tl.reshape(hi, (BLOCK_N, GROUPS, GROUP_SIZE // 2)) * s[:, :, None], (BLOCK_N, BLOCK_K // 2))
            # x in one contiguous (vectorised) load, then split into its even and odd k (two strided loads would
            # issue a scalar load per element, for every row of weights that shares them).
            offs_k = 2 * kb + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))  # (BM, BK/2) each
            acc = _mac(acc, x_even, lo, USE_DOT, DOT_DTYPE, DOT_PRECISION)
            acc = _mac(acc, x_odd, hi, USE_DOT, DOT_DTYPE, DOT_PRECISION)
        acc = _reduce(acc, USE_DOT)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_wo_matmul_tuned = triton.autotune(
    configs=[_triton_config(c, 1) for c in CANDIDATES],  # replaced per call by _prune
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "WORDS"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_autotune_bench,
)(_wo_matmul_kernel)


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape (M, K) with K={k}, got {tuple(x.shape)}")


def _word_aligned(w: torch.Tensor, k: int, bits: int) -> bool:
    """Whether the packed rows can be read as whole int32 words: row starts 4-byte aligned, K a multiple of 4 (INT8;
    INT4 groups are multiples of 32), bytes contiguous."""
    return w.stride(1) == 1 and w.stride(0) % 4 == 0 and w.data_ptr() % 4 == 0 and (bits == 4 or k % 4 == 0)


def _launch(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    scale_strides: tuple[int, int],
    n: int,
    k: int,
    bits: int,
    group_size: int,
    config: WoConfig | None,
    words: bool,
) -> torch.Tensor:
    """One launch over (N tiles, M tiles): autotuned on a GPU unless `config` is given; the interpreter's default
    config on CPU. Returns (M, N) in x's dtype."""
    m = x.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    m_bucket = triton.next_power_of_2(m)
    args = (x, w, scale, out, m, n, k, w.shape[1], *x.stride(), *w.stride(), *scale_strides, *out.stride())
    meta = dict(
        M_BUCKET=m_bucket, BITS=bits, GROUP_SIZE=group_size, WORDS=words and _word_aligned(w, k, bits), **dot_args(x)
    )
    if config is None and x.is_cuda:
        _wo_matmul_tuned[lambda p: (triton.cdiv(n, p["BLOCK_N"]), triton.cdiv(m, p["BLOCK_M"]))](*args, **meta)
        return out
    c = config or WoConfig(INTERPRET_CONFIG.block_n, max(INTERPRET_CONFIG.block_k, group_size))
    if bits == 4 and c.block_k < group_size:
        raise ValueError(f"config.block_k must be >= group_size={group_size}, got {c.block_k}")
    tc = _triton_config(c, m_bucket)
    grid = (triton.cdiv(n, c.block_n), triton.cdiv(m, tc.kwargs["BLOCK_M"]))
    _wo_matmul_kernel[grid](*args, **meta, **tc.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    return out


def int8_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ dequant(q, scale).T -> (M, N) in x's dtype: dequantise, then a plain matmul."""
    return x @ unpack_int8(q, scale).to(x.dtype).T


def int4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) @ dequant(packed, scales).T -> (M, N) in x's dtype: dequantise, then a plain matmul."""
    return x @ unpack_int4(packed, scales, group_size).to(x.dtype).T


def int8_matmul_triton(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, config: WoConfig | None = None, words: bool = True
) -> torch.Tensor:
    """The fused Triton kernel, INT8: x (M, K), q int8 (N, K), scale fp32 (N,) -> (M, N).
    `config` fixes the launch (None: autotuned on a GPU, INTERPRET_CONFIG on CPU); `words=False` keeps the FMA path on
    byte loads (tests)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be a 2-D int8 tensor (N, K), got {q.dim()}-D {q.dtype}")
    n, k = q.shape
    _check_x(x, k)
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 of shape (N,)=({n},), got {scale.dtype} {tuple(scale.shape)}")
    return _launch(x, q, scale, (scale.stride(0), 0), n, k, 8, 1, config, words)


def int4_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    config: WoConfig | None = None,
    words: bool = True,
) -> torch.Tensor:
    """The fused Triton kernel, INT4: x (M, K), packed uint8 (N, K//2), scales fp32 (N, K//G) -> (M, N).
    `config` fixes the launch (None: autotuned on a GPU, INTERPRET_CONFIG on CPU); `words=False` keeps the FMA path on
    byte loads (tests)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor (N, K // 2), got {packed.dim()}-D {packed.dtype}")
    n, k = packed.shape[0], packed.shape[1] * 2
    check_group_size(group_size, k)
    _check_x(x, k)
    if scales.shape != (n, k // group_size) or scales.dtype != torch.float32:
        raise ValueError(
            f"scales must be float32 of shape (N, K // group_size)=({n}, {k // group_size}), "
            f"got {scales.dtype} {tuple(scales.shape)}"
        )
    return _launch(x, packed, scales, scales.stride(), n, k, 4, group_size, config, words)


def _fused(impl: Impl, x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """ "auto" fuses on CUDA for M <= MAX_FUSED_M only: larger M is compute-bound, where cuBLAS wins."""
    return use_triton(impl, x, *weights) and (impl == "triton" or x.shape[0] <= MAX_FUSED_M)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """x (..., K) @ dequant(q int8 (N, K), scale (N,)).T -> (..., N) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if _fused(impl, x2, q, scale):
        y = int8_matmul_triton(x2, q, scale)
    else:
        y = int8_matmul_reference(x2, q, scale)
    return y.reshape(*x.shape[:-1], q.shape[0])


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, *, impl: Impl = "auto"
) -> torch.Tensor:
    """x (..., K) @ dequant(packed uint8 (N, K//2), scales (N, K//G)).T -> (..., N) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if _fused(impl, x2, packed, scales):
        y = int4_matmul_triton(x2, packed, scales, group_size)
    else:
        y = int4_matmul_reference(x2, packed, scales, group_size)
    return y.reshape(*x.shape[:-1], packed.shape[0])
