"""Weight-only quantized matmul for decoding: y = x @ dequant(w).T with INT8 or INT4 weights.

At decode time M (tokens in flight) is small (1..16) and a linear layer is bound by reading its weight, so storing
it in 8 or 4 bits reads 2x or 4x fewer bytes than bf16. One Triton kernel serves both formats (gpt-fast / GemLite
style GEMV): each program owns BLOCK_N output channels and streams their rows of the packed weight, K contiguous (the
layout of `kernels/quant_format.py`, row-major (N, K) or (N, K // 2)); it dequantises in registers and accumulates in
fp32. The full-precision weight never exists in memory.

Dequantisation (word path: 4-byte aligned rows, the usual case): the weight is read as int32 words (4 INT8 or 8 INT4
weights) and each field is moved under the mantissa of 1.0 (one shift and one LOP3: `_unit`), giving v = 1 + u / 2^b
with q = 2^b (v - 1.5): no int -> float conversions, which run at a quarter of the FMA rate and bounded the INT4
GEMV before (the magic-number trick of FasterTransformer / Marlin / GemLite, in fp32). Group scales multiply each
word's partial sum, not each weight; INT8's per-channel scale multiplies the finished sum.

Inner products, chosen by the autotuner per (M bucket, N, K, format) and timed inside a CUDA graph:
- "FMA": acc (BM, BN, words) += sum over a word's fields of (2^b x) * v, one FMA per weight per row of M, reduced
  over K once after the loop: no tensor cores, no padding of M. Right at small M (M = 1: the only path).
- "dot" (M >= 2): swapped, acc (BN, BM) += w (BN, BK) @ x.T (BK, BM), so `tl.dot`'s 16-row minimum pads M, not N;
  each weight tile is dequantised once (one FMA per weight for INT4: exactly fp32 (u - 8) s, as the reference) and
  put in k order by nested `tl.join`s, then converted to x's dtype for the tensor cores.
- split-K (dot configs, N <= MAX_SPLIT_N): SPLIT_K programs share an output tile's K, each writes fp32 partials, and
  the last to take the tile's atomic ticket sums them in slice order and resets the ticket: one launch, no memset,
  graph-safe. At N = 768 and BLOCK_N 16 one program per tile is 48 programs for 132 SMs, each walking a K of
  2048..3072; split, each has 1..3 steps, all in flight.
Rows that are not 4-byte aligned take the byte path (the same FMA / dot split, bytes widened in registers); so do the
byte-load dot configs (`BYTE_DOT_ENTRIES`, M 2..16), offered beside the word path's for the autotuner to weigh, and
the word path's INT4 dot configs come twice: scales loaded per word, or per group (`group_scales`). Built by the GPU's
triton (3.6), the per-word INT4 word dot reads its words and scales from shared memory with 8- to 32-way bank
conflicts, which the other two do not (kernels/README.md, "18m: the M=16 SASS").

One launch per call, no host sync, no allocation but the output (and the split configs' partials): the kernel can be
captured in a CUDA graph after a first, autotuning call outside the capture (which also allocates the device's
tickets). Split launches share the tickets of their device: calls on one stream are serialised, as decoding runs them.

Per kernel:
    int8_matmul_reference / int4_matmul_reference   dequantise-then-matmul in PyTorch (the truth)
    int8_matmul_triton    / int4_matmul_triton      the fused Triton kernel (any M; meant for M <= 16); `config` fixes
                                                    the path (WoConfig: FMA / dot, split_k, byte_loads,
                                                    group_scales), `words=False` the byte path
    int8_matmul           / int4_matmul             wrappers, x (..., K); impl="auto" (Triton for CUDA
                                                    inputs with M <= MAX_FUSED_M, the reference otherwise: CPU,
                                                    or prefill-sized M where dequantise + cuBLAS wins),
                                                    "triton" or "reference" (kernels/dispatch.py)
Every candidate config compiles for sm_90 without spilling (kernels/wo_matmul_compile_test.py).

Targets (kernels/inference_bench.py, timed inside a CUDA graph beside cuBLAS bf16 `F.linear` captured the same way,
weights cold in L2): at least bf16 at every linear width of the `large` and `gpt2-124m` presets for M = 1..16; at the
lm_head (768 -> 50304, M = 1) INT8 >= 1.2x and INT4 >= 1.5x bf16, >= 60% of copy bandwidth on the weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.dispatch import SPLIT_TICKETS, Impl, split_tickets, use_triton
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
    "dot_tile_elements",
    "fma_tile_elements",
    "max_split",
]

MAX_FUSED_M = 64  # above this the wrappers dequantise and call cuBLAS
MAX_FMA_M = 16  # the FMA path's M tile is the whole M bucket: beyond this only the dot path is offered
# (BM, BN) pairs of an FMA tile from M 2. 18w set 64 (BLOCK_N <= 4 at M 16); 8- and 16-row tiles at M 8 and 16 build
# for sm_90 without spills (kernels/wo_matmul_compile_test.py), so they are offered again and the autotuner times them.
# (They did not bring back the M=16 INT4 lm_head's 0.0178 ms: that was the byte path's tl.dot, see BYTE_DOT_ENTRIES.)
MAX_FMA_PAIRS = 256
FMA_REGISTER_BUDGET = 48  # fp32 accumulator elements per thread of the FMA path (fma_tile_elements; 64 spilled)
DOT_REGISTER_BUDGET = 128  # tile values per thread of the dot path (dot_tile_elements)
# INT4 with groups of 128+ read byte by byte (the byte path, or byte_loads on the word path): triton 3.6's sm_90 builds
# spilled 24-72 B at 84-100 values per thread (BM16: 32x256 and 64x128 over 4 warps, 64x256 over 8; the H200's GPU tests,
# twelfth session), where groups of 32 and the word loads did not
DOT_BYTES_WIDE_GROUP_BUDGET = 80
# per config: do_bench_cudagraph replays a graph of about rep / (lone-call ms) calls 10 times. 3 ms (was 10) is still
# 100+ calls per replay, and an autotuning pass (~10-35 configs per shape, M bucket and format) takes ~0.5-1.5 s
AUTOTUNE_REP_MS = 3
# Split-K (dot configs, M 2..64): K is cut into SPLIT_K slices, one program each; the last program of an output tile
# to finish (an atomic ticket per tile) adds the slices' fp32 partial sums, writes the output and resets the ticket,
# so one launch does it all and a CUDA graph can replay it. Offered only where N is small enough that (SPLIT_K, M, N)
# fp32 partials stay small (never the lm_head, which has programs enough without).
MAX_SPLIT_K = 8
MAX_SPLIT_N = 8192


# The fp32 bits of 1.0 that `_unit` puts a field under: INT8 also flips the byte's sign bit (bit 22 once moved).
UNIT_BITS = {4: 0x3F800000, 8: 0x3F800000 | 1 << 22}


@dataclass(frozen=True)
class WoConfig:
    """One launch configuration: BLOCK_N output channels per program, BLOCK_K inputs per step, FMA or dot, how many
    programs share an output tile's K (split_k, dot only), whether the weight is read byte by byte even where its rows
    are word-aligned (byte_loads: the byte path, `_wo_bytes`, as `words=False` forces it), and whether INT4 on the word
    path loads each group's scale once and repeats it to the group's words in registers (group_scales) instead of
    loading it once per word."""

    block_n: int
    block_k: int
    use_dot: bool = False
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1
    byte_loads: bool = False
    group_scales: bool = False

    def block_m(self, m: int) -> int:
        """The M tile: the whole M bucket for FMA, 16..64 rows for dot (its minimum is 16)."""
        bucket = triton.next_power_of_2(max(m, 1))
        return max(16, min(bucket, 64)) if self.use_dot else bucket


# Interpreter (CPU tests) default: small tiles, FMA (BLOCK_K raised to the INT4 group size where smaller).
INTERPRET_CONFIG = WoConfig(block_n=8, block_k=64)

# (BLOCK_N, BLOCK_K, num_warps, num_stages): rows of 128..1024 contiguous bytes per channel per step for INT8. The
# 2- and 4-row tiles keep one program per SM or more at N = 256..768 (and fit M = 8..16 in the register budget).
# The 32..128-row tiles are for M = 1 at large N (the lm_head): a thread then holds several rows of the same words, so
# the x values it loads for a word serve all of them (INT4 in the sm_90 SASS: 8.5 instructions per weight at 8 rows
# per program, 4.9 at 64 rows over 4 warps, 4.4 at 128: a shift, a LOP3 and an FMA each, the rest x loads/converts).
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
    (32, 256, 4, 3),
    (64, 256, 4, 3),
    (64, 512, 8, 2),
    (128, 256, 8, 2),
    (128, 256, 4, 2),
)
# (BLOCK_N, BLOCK_K, num_warps, num_stages, split_k). N = 768 at BLOCK_N 16 is 48 tiles for 132 SMs: the splits give
# 96..384 programs, each with 1..3 K steps in flight at once (num_stages), where one program per tile would walk all
# of a K of 2048..3072 one latency at a time.
_DOT_ENTRIES = (
    (16, 128, 4, 3, 1),
    (16, 256, 4, 3, 1),
    (32, 256, 4, 3, 1),
    (64, 128, 4, 3, 1),
    (64, 256, 8, 3, 1),
    (16, 256, 4, 3, 2),
    (32, 256, 4, 3, 2),
    (16, 256, 4, 3, 4),
    (32, 128, 4, 3, 4),
    (16, 128, 4, 3, 8),
    (32, 128, 4, 3, 8),
)
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of dot configs on the byte path for word-aligned rows (issue 18m): the dot
# set of 8c88389, whose M=16 INT4-g32 lm_head ran 0.0178 ms on the H200 (the word path's dot since: 0.0577). Its sm_90
# loop (triton 3.6, the GPU's) has 2 barriers per K step and conflict-free 16-byte shared loads.
BYTE_DOT_ENTRIES = ((16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 4, 3))
MAX_BYTE_DOT_M = 16  # M buckets with byte-load dot configs (a 16-row M tile): at 64 rows most of them spilled (sm_90)
# The word path's INT4 dot configs again with group_scales (issue 18m): with a scale loaded per word, triton 3.6 (the
# GPU's) loads the pipelined words and scales from shared memory one 4-byte element per lane, the lanes down the rows
# of an unswizzled (BLOCK_N, words) tile: 8- to 32-way bank conflicts on every load. One load per group leaves the
# words in 16-byte loads along K (the INT8 word dot's layout) in the same build.


def _triton_config(c: WoConfig, m_bucket: int) -> triton.Config:
    kw = dict(BLOCK_M=c.block_m(m_bucket), BLOCK_N=c.block_n, BLOCK_K=c.block_k, USE_DOT=c.use_dot, SPLIT_K=c.split_k)
    kw.update(BYTE_LOADS=c.byte_loads, GROUP_SCALES=c.group_scales)
    return triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)


CANDIDATES = (
    tuple(WoConfig(bn, bk, False, w, s) for bn, bk, w, s in _FMA_ENTRIES)
    + tuple(WoConfig(bn, bk, True, w, s, split) for bn, bk, w, s, split in _DOT_ENTRIES)
    + tuple(WoConfig(bn, bk, True, w, s, byte_loads=True) for bn, bk, w, s in BYTE_DOT_ENTRIES)
    + tuple(WoConfig(bn, bk, True, w, s, split, group_scales=True) for bn, bk, w, s, split in _DOT_ENTRIES)
)


def fma_tile_elements(m_bucket: int, c: WoConfig, group_size: int, words: bool) -> int:
    """fp32 accumulator elements of the FMA path per program: (BM, BN, BK), or (BM, BN, BK / weights per word) when
    the weight is read as words (4 INT8 or 8 INT4 weights each)."""
    per_word = (4 if group_size == 1 else 8) if words else 1
    return m_bucket * c.block_n * c.block_k // per_word


def max_split(m: int, n: int) -> int:
    """The most K slices a launch may use: MAX_SPLIT_K from M 2 (where the dot path runs) while N <= MAX_SPLIT_N."""
    return MAX_SPLIT_K if 2 <= m <= MAX_FUSED_M and n <= MAX_SPLIT_N else 1


def dot_tile_elements(m_bucket: int, c: WoConfig) -> int:
    """Values per program of the dot path: the x tile (BK, BM), the dequantised weight tile (BN, BK), the
    accumulator."""
    block_m = c.block_m(m_bucket)
    return c.block_k * block_m + c.block_n * c.block_k + c.block_n * block_m


def candidate_configs(m_bucket: int, k: int, group_size: int, words: bool = False, split: int = 1) -> list[WoConfig]:
    """The configs worth timing for an M bucket: FMA only while its accumulator fits the register budget (and its x
    tile and per-field products: at most MAX_FMA_PAIRS (BM, BN) pairs from M 2), dot only from M 2 on (at M 1 a 16-row tile is all
    padding) and while its tiles fit DOT_REGISTER_BUDGET; INT4 tiles hold whole groups (BLOCK_K >= group_size); split
    configs up to `split` slices, each at least BLOCK_K long; the byte-load dot configs up to MAX_BYTE_DOT_M, and they
    and the group-scale ones (INT4) only where the rows are read as words (on the byte path they would repeat the dot
    configs). Beyond these budgets the sm_90 builds spilled
    (kernels/wo_matmul_compile_test.py). group_size 1 means INT8."""
    keep = []
    for c in CANDIDATES:
        if c.block_k < group_size or c.block_k > max(triton.next_power_of_2(k), group_size, 64):
            continue
        if c.byte_loads and (not words or m_bucket > MAX_BYTE_DOT_M):
            continue
        if c.group_scales and (not words or group_size == 1):
            continue
        threads = 32 * c.num_warps
        if c.use_dot:
            wide_group_bytes = group_size >= 128 and (c.byte_loads or not words)
            budget = DOT_BYTES_WIDE_GROUP_BUDGET if wide_group_bytes else DOT_REGISTER_BUDGET
            fits = dot_tile_elements(m_bucket, c) <= budget * threads
            if m_bucket >= 2 and fits and c.split_k <= split and triton.cdiv(k, c.split_k) >= c.block_k:
                keep.append(c)
        elif (
            m_bucket <= MAX_FMA_M
            and (m_bucket == 1 or m_bucket * c.block_n <= MAX_FMA_PAIRS)
            and m_bucket * c.block_k <= 32 * threads
        ):
            if fma_tile_elements(m_bucket, c, group_size, words) <= FMA_REGISTER_BUDGET * threads:
                keep.append(c)
    return keep or [c for c in CANDIDATES if c.use_dot and c.split_k == 1 and c.block_k >= group_size][:1]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune hook: the candidates for this call's M bucket, K, format, load path and split limit, BLOCK_M filled
    in."""
    m_bucket, group_size = kwargs["M_BUCKET"], kwargs["GROUP_SIZE"]
    splits = max_split(m_bucket, named_args["N"])  # as _launch sized the partials: M >= 2 iff its bucket is
    found = candidate_configs(m_bucket, named_args["K"], group_size, kwargs["WORDS"], splits)
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
def _unit(words, one_bits, FIELD: tl.constexpr, BITS: tl.constexpr):
    """Field FIELD (bits FIELD * BITS ..) of int32 `words` as the fp32 v = 1 + u / 2^BITS, u the field read unsigned
    (INT4: the nibble 0..15; INT8: the byte's bits with the sign flipped, q + 128): the field is moved under the top of
    the mantissa of 1.0, `one_bits` (UNIT_BITS[BITS]): one shift and one LOP3, no int -> float conversion. With 1.0 a
    constant the compiler spent two LOP3s (an instruction takes one immediate); as an argument it stays in a register.
    The weight q (INT4 u - 8) is 2^BITS (v - 1.5) (the magic-number trick of FasterTransformer / Marlin / GemLite, in
    fp32)."""
    TOP: tl.constexpr = 23 - BITS  # the field's lowest bit once it sits right under the exponent
    SHIFT: tl.constexpr = TOP - FIELD * BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << TOP
    if SHIFT >= 0:
        t = words << SHIFT
    else:
        t = words >> (-SHIFT)  # arithmetic on int32, but the mask drops the copied sign bits
    return ((t & MASK) ^ one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _fma_words_step(
    words, one_bits, x_cols, x_mask, stride_xk, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One K step of the FMA path: words (BN, W) times x. x_cols (BM, W) points at x[m, per_word * j] (field 0 of
    word j); each field's x is loaded straight into the words' layout (L1 hits), not split out of one x tile (which
    went through shared memory with barriers every step). Returns P = sum over the word's fields of x * v, (BN, W) at
    BM == 1 else (BM, BN, W), and X = the word's sum of x (BM, W): the integer-weight sum of the word is
    2^BITS (P - 1.5 X) (x v = x q / 2^BITS + 1.5 x)."""
    for i in tl.static_range(32 // BITS):
        xi = tl.load(x_cols + i * stride_xk, mask=x_mask, other=0.0).to(tl.float32)  # (BM, W)
        v = _unit(words, one_bits, i, BITS)  # (BN, W)
        if BLOCK_M == 1:
            term = v * xi
        else:
            term = v[None, :, :] * xi[:, None, :]
        if i == 0:
            p = term
            xs = xi
        else:
            p += term
            xs += xi
    return p, xs


@triton.jit
def _weight(words, one_bits, a, b, FIELD: tl.constexpr, BITS: tl.constexpr):
    """Field FIELD's dequantised weight (BN, W) fp32: q (INT8, exact; its per-channel scale comes after the K loop) or
    (u - 8) * s (INT4), one FMA from v: a v + b with a = 2^BITS s, b = -1.5 2^BITS s."""
    R: tl.constexpr = 1 << BITS
    v = _unit(words, one_bits, FIELD, BITS)
    if BITS == 4:
        w = v * a + b
    else:
        w = v * R - 1.5 * R
    return w


@triton.jit
def _dequant_words(words, one_bits, s, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """words (BN, W) -> the dequantised weight tile (BN, BK) fp32 in k order (k = per_word * j + field). `tl.join` puts
    its new axis last, in each thread's own registers, so nesting joins with the field's low bit outermost and reshaping
    orders the fields without moving data between threads."""
    R: tl.constexpr = 1 << BITS
    if BITS == 4:
        a = s * R
        b = s * (-1.5 * R)
        even = tl.join(
            tl.join(_weight(words, one_bits, a, b, 0, 4), _weight(words, one_bits, a, b, 4, 4)),
            tl.join(_weight(words, one_bits, a, b, 2, 4), _weight(words, one_bits, a, b, 6, 4)),
        )  # (BN, W, 2, 2): fields 4 i2 + 2 i1 at [.., i2, i1]
        odd = tl.join(
            tl.join(_weight(words, one_bits, a, b, 1, 4), _weight(words, one_bits, a, b, 5, 4)),
            tl.join(_weight(words, one_bits, a, b, 3, 4), _weight(words, one_bits, a, b, 7, 4)),
        )
        w = tl.join(even, odd)  # (BN, W, 2, 2, 2): field 4 i2 + 2 i1 + i0
    else:
        even = tl.join(_weight(words, one_bits, s, s, 0, 8), _weight(words, one_bits, s, s, 2, 8))
        odd = tl.join(_weight(words, one_bits, s, s, 1, 8), _weight(words, one_bits, s, s, 3, 8))
        w = tl.join(even, odd)  # (BN, W, 2, 2): field 2 i1 + i0
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _wo_words(
    x_ptr, one_bits, offs_m, m_mask, w_ptr, scale_ptr, offs_n, n_mask, w_lo, w_hi, stride_xm, stride_xk, stride_wn,
    stride_sn, stride_sg, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, GROUP_SCALES: tl.constexpr,
):  # fmt: skip
    """The weight read as 32-bit words (4 INT8 or 8 INT4 weights each), words w_lo..w_hi of each row, dequantised by
    `_unit` (no int -> float conversions: those run at a quarter of the FMA rate and bounded the old INT4 path). The
    weight tile stays in the (BN, words) layout it was loaded in (loading bytes and widening them to an fp32
    accumulator of another layout made the compiler copy each weight tile through shared memory with two barriers per
    step). FMA: acc (BN, W) or (BM, BN, W) per word, reduced after the loop; INT4 applies each word's group scale to
    the word's partial sum (one FMA per word, not per weight). Dot, swapped (weights on the left, so the 16-row minimum
    of `tl.dot` pads M, not N): the tile dequantised once (`_dequant_words`), then `tl.dot` with fp32 accumulation.
    Needs 4-byte aligned rows (the wrapper checks). Returns (BM, BN) fp32, scales applied."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    R: tl.constexpr = 1 << BITS
    rows = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_wn // 4)  # (BN, 1)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BM, 1)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
    x_total = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)  # INT8 FMA: the sum of x, for the -1.5 R sum(x) term
    for kw in range(w_lo, w_hi, WORDS):
        offs_w = kw + tl.arange(0, WORDS)
        if EVEN_K:  # masks constant along K: the compiler can load 16-byte vectors (a ragged one splits them up)
            w_mask = tl.full((WORDS,), 1, tl.int1)
        else:
            w_mask = offs_w < w_hi
        words = tl.load(rows + offs_w[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)  # (BN, W)
        if BITS == 4 and GROUP_SCALES:  # one load per group, repeated to the group's words in registers
            WPG: tl.constexpr = GROUP_SIZE // PER_WORD  # words per group (a step holds whole groups)
            offs_g = kw // WPG + tl.arange(0, WORDS // WPG)
            if EVEN_K:
                g_mask = tl.full((WORDS // WPG,), 1, tl.int1)
            else:
                g_mask = offs_g < w_hi // WPG
            s = tl.load(
                scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :] * stride_sg,
                mask=n_mask[:, None] & g_mask[None, :],
                other=0.0,
            )  # (BN, groups)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, WORDS // WPG, WPG)), (BLOCK_N, WORDS))
        elif BITS == 4:
            g = offs_w * PER_WORD // GROUP_SIZE  # the group of each word (groups hold whole words)
            s = tl.load(
                scale_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                mask=n_mask[:, None] & w_mask[None, :],
                other=0.0,
            )  # (BN, W)
        else:
            s = None
        if USE_DOT:  # swapped: acc (BN, BM) += w (BN, BK) @ x.T (BK, BM)
            offs_k = kw * PER_WORD + tl.arange(0, BLOCK_K)
            if EVEN_K:
                k_mask = tl.full((BLOCK_K,), 1, tl.int1)
            else:
                k_mask = offs_k < w_hi * PER_WORD
            x_t = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                mask=k_mask[:, None] & m_mask[None, :],
                other=0.0,
            )  # (BK, BM)
            w = _dequant_words(words, one_bits, s, BITS, BLOCK_N, BLOCK_K)
            acc += tl.dot(w.to(DOT_DTYPE), x_t.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        else:
            x_cols = x_rows + (offs_w * PER_WORD)[None, :] * stride_xk  # (BM, W): field 0 of each word
            x_mask = m_mask[:, None] & w_mask[None, :]
            p, xs = _fma_words_step(words, one_bits, x_cols, x_mask, stride_xk, BITS, BLOCK_M)
            # masked words are 0 (v = 1 or 1.5) against x = 0
            if BITS == 8:
                acc += p
                x_total += xs
            elif BLOCK_M == 1:
                acc += s * (p - 1.5 * xs)
            else:
                acc += s[None, :, :] * (p - 1.5 * xs[:, None, :])
    if USE_DOT:
        out = tl.trans(acc)  # (BM, BN)
    else:
        if BLOCK_M == 1:
            out = tl.sum(acc, axis=1)[None, :]  # (1, BN)
        else:
            out = tl.sum(acc, axis=2)  # (BM, BN)
        if BITS == 8:
            out -= 1.5 * tl.sum(x_total, axis=1)[:, None]
        out *= R
    if BITS == 8:
        out *= tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
    return out


@triton.jit
def _wo_bytes(
    x_ptr, offs_m, m_mask, w_ptr, scale_ptr, offs_n, n_mask, k_lo, k_hi, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_sn, stride_sg, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The weight read byte by byte (rows not 4-byte aligned, or `words=False`), inputs k_lo..k_hi: FMA or dot.
    Returns (BM, BN) fp32, scales applied."""
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BM, 1)
    w_rows = w_ptr + offs_n[:, None] * stride_wn  # (BN, 1)
    # The accumulator: (BM, BN) for dot; (BM, BN, K elements per step) for FMA (two nibbles share an INT4 byte).
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // (2 if BITS == 4 else 1)), dtype=tl.float32)
    if BITS == 8:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
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
        kb_hi = k_hi // 2
        # Loop over packed bytes (kb = k0 / 2): the compiler then sees the byte offsets' alignment and the mask's
        # constancy, and loads the weight in 4..16-byte vectors (with k0 = 2 kb it fell back to one byte per load).
        for kb in range(k_lo // 2, kb_hi, BLOCK_K // 2):
            offs_b = kb + offs_j  # (BK/2,) bytes of this step
            b_mask = offs_b < kb_hi
            b = tl.load(w_rows + offs_b[None, :] * stride_wk, mask=n_mask[:, None] & b_mask[None, :], other=0)
            # (BN, BK/2) uint8
            g = kb // (GROUP_SIZE // 2) + offs_g
            s = tl.load(
                scale_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg,
                mask=n_mask[:, None] & (g < kb_hi // (GROUP_SIZE // 2))[None, :],
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
            x = tl.load(
                x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & (offs_k < k_hi)[None, :], other=0.0
            )
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))  # (BM, BK/2) each
            acc = _mac(acc, x_even, lo, USE_DOT, DOT_DTYPE, DOT_PRECISION)
            acc = _mac(acc, x_odd, hi, USE_DOT, DOT_DTYPE, DOT_PRECISION)
        acc = _reduce(acc, USE_DOT)
    return acc


@triton.jit
def _store(acc, out_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_om, stride_on,
           SPLIT_K: tl.constexpr):  # fmt: skip
    """Write acc (BM, BN) fp32 to out. SPLIT_K > 1: into this slice's plane of the (SPLIT_K, M, N) partials instead;
    the last slice of the tile to take a ticket sums the planes, writes out and resets the ticket to 0."""
    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        plane = offs_m[:, None] * N + offs_n[None, :]  # (BM, BN) offsets inside one (M, N) plane
        tl.store(ws_ptr + tl.program_id(2) * M * N + plane, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials are written before the ticket (which releases them) is taken
        ticket = ticket_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):  # in slice order: the sum does not depend on who finished last (not unrolled)
                total += tl.load(ws_ptr + s * M * N + plane, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")  # the next launch (or graph replay) starts at 0


@triton.jit
def _wo_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,  # x (M, K); w int8 (N, K) or uint8 (N, K // 2); scales fp32 (N,) or (N, K // G); out (M, N)
    ws_ptr,  # fp32 (max_split(M, N), M, N) partial sums of the split configs (unused at SPLIT_K 1)
    ticket_ptr,  # int32 tickets, one per output tile, 0 between launches (split configs only)
    M,
    N,
    K,
    KH,  # bytes per weight row: K // 2 for INT4, K for INT8
    one_bits,  # UNIT_BITS[BITS], an argument so that the compiler keeps it in a register (_unit)
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
    WORDS: tl.constexpr,  # 4-byte aligned weight rows: read as int32 words (_wo_words)
    SPLIT_K: tl.constexpr,  # programs along K per output tile (grid axis 2)
    BYTE_LOADS: tl.constexpr,  # the config reads bytes even where WORDS (WoConfig.byte_loads)
    GROUP_SCALES: tl.constexpr,  # INT4 words: one scale load per group (WoConfig.group_scales)
    EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: every step of every slice is whole (_even_k)
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:  # slices of whole BLOCK_K steps (so whole words and whole INT4 groups)
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(2) * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
    if WORDS and not BYTE_LOADS:
        PER_WORD: tl.constexpr = 32 // BITS
        acc = _wo_words(
            x_ptr, one_bits, offs_m, m_mask, w_ptr, scale_ptr, offs_n, n_mask, k_lo // PER_WORD, k_hi // PER_WORD,
            stride_xm, stride_xk, stride_wn, stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT,
            DOT_DTYPE, DOT_PRECISION, EVEN_K, GROUP_SCALES,
        )  # fmt: skip
    else:
        acc = _wo_bytes(
            x_ptr, offs_m, m_mask, w_ptr, scale_ptr, offs_n, n_mask, k_lo, k_hi, stride_xm, stride_xk, stride_wn,
            stride_wk, stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE,
            DOT_PRECISION,
        )  # fmt: skip
    _store(acc, out_ptr, ws_ptr, ticket_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_om, stride_on, SPLIT_K)


def _even_k(args: dict) -> bool:
    """Heuristic: whether every K step of every slice is whole, so that the word path's loads need no K mask."""
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


_wo_matmul = triton.heuristics({"EVEN_K": _even_k})(_wo_matmul_kernel)
_wo_matmul_tuned = triton.autotune(
    configs=[_triton_config(c, 1) for c in CANDIDATES],  # replaced per call by _prune
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "WORDS"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_autotune_bench,
)(_wo_matmul)


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must have shape (M, K) with K={k}, got {tuple(x.shape)}")


def _word_aligned(w: torch.Tensor, k: int, bits: int) -> bool:
    """Whether the packed rows can be read as whole int32 words: row starts 4-byte aligned, K a multiple of 4 (INT8;
    INT4 groups are multiples of 32), bytes contiguous."""
    return w.stride(1) == 1 and w.stride(0) % 4 == 0 and w.data_ptr() % 4 == 0 and (bits == 4 or k % 4 == 0)


def _tickets(device: torch.device) -> torch.Tensor:
    return split_tickets(device, "wo_matmul")


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
    """One launch over (N tiles, M tiles, K slices): autotuned on a GPU unless `config` is given; the interpreter's
    default config on CPU. Returns (M, N) in x's dtype."""
    m = x.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    m_bucket = triton.next_power_of_2(m)
    splits = config.split_k if config is not None else (max_split(m, n) if x.is_cuda else 1)
    if splits > 1 and triton.cdiv(n, 16) * triton.cdiv(m, 16) > SPLIT_TICKETS:
        raise ValueError(f"split_k > 1 needs N <= {MAX_SPLIT_N} and M <= {MAX_FUSED_M}, got N={n}, M={m}")
    ws = torch.empty((splits, m, n), device=x.device, dtype=torch.float32) if splits > 1 else scale
    args = (x, w, scale, out, ws, _tickets(x.device), m, n, k, w.shape[1], UNIT_BITS[bits])
    args += (*x.stride(), *w.stride(), *scale_strides, *out.stride())
    meta = dict(M_BUCKET=m_bucket, BITS=bits, GROUP_SIZE=group_size, WORDS=words and _word_aligned(w, k, bits))
    meta.update(dot_args(x))
    if config is None and x.is_cuda:
        grid = lambda p: (triton.cdiv(n, p["BLOCK_N"]), triton.cdiv(m, p["BLOCK_M"]), p["SPLIT_K"])  # noqa: E731
        _wo_matmul_tuned[grid](*args, **meta)
        return out
    c = config or WoConfig(INTERPRET_CONFIG.block_n, max(INTERPRET_CONFIG.block_k, group_size))
    if bits == 4 and c.block_k < group_size:
        raise ValueError(f"config.block_k must be >= group_size={group_size}, got {c.block_k}")
    if c.split_k > 1 and not c.use_dot:
        raise ValueError(f"config.split_k > 1 needs use_dot=True, got {c}")
    tc = _triton_config(c, m_bucket)
    grid = (triton.cdiv(n, c.block_n), triton.cdiv(m, tc.kwargs["BLOCK_M"]), c.split_k)
    _wo_matmul[grid](*args, **meta, **tc.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
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
