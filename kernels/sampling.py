"""The serving engine's full sampler in one Triton launch: penalty, temperature, top-k, top-p, the seeded draw.

Its PyTorch reference, and `sample_slots`, which picks the kernel on CUDA (or under the interpreter with impl="triton")
and the reference elsewhere, live in `model.sampling` (`sample_slots_reference`: `penalise` and
`uniforms` (both defined here), `sample_rows`, which sorts every row): kernels import torch and triton only. `advance_slots` is the state update after a step (next inputs, positions, seen masks) in one launch.
Both read the decode loop's per-slot state (`inference_svc.runner.SlotState`) directly: logits row b belongs to
slot `slots[b]`, whose sampling settings and seen-token mask are gathered in the kernel.

No sort. Row b's sorted order (descending value, ties by lower index: torch's stable sort) is the order of one
integer per token, `composite = key(x) << IDX_BITS | (IDX_MAX - index)`, where key() maps float32 to uint32
monotonically (-0.0 folded onto +0.0). Every cut the sampler makes is "the prefix of that order whose weight reaches
a target": top-k (weight 1, target k), top-p (weight p, target top_p: the token whose inclusion reaches top_p is
the last kept), the draw (weight p over the kept tokens, first prefix exceeding u * total, as `searchsorted(...,
right=True)`). `_search` finds such a cut by a 16-way search over the composite's integer range: each pass over the
row counts the weight at or above 15 thresholds at once, so a 48-bit range takes about 12 passes, whatever V. The
answer is a token's composite, so ties and ranks are exact; the sums (float64 accumulators over float32
probabilities) differ from torch's cumsum only by rounding, which moves a cut or a draw only when its target lies
within rounding of a boundary. torch's float32 cumsum can itself drift that far over 50k near-equal probabilities:
the tests accept a kernel token that differs from torch's only where it is the float64 path's.

One program per row; the penalised, scaled logits go to a (B, V) float32 scratch so the later passes read one
array. Rows that are greedy, or degenerate (a NaN, +inf or all -inf: torch's non-finite total), stop after the
first pass and take the argmax of the penalised logits (the first NaN where there is one, as torch.argmax).
The searches by count (top-k) and by mass (top-p) stop early once at most k + LIST_SLACK (top-p: LIST_SLACK) tokens
lie above their threshold: those are written to a (B, V) int64 scratch list of composites, the search resumes over
the list, and every later pass reads only the list. So a row is read whole about 1 + 4 + 1 times with top-k 50 or a
peaked top-p, up to 1 + 1 + 12 + 1 with a flat one, and 1 + 1 + 1 + 12 with neither. top_p = 1 skips the top-p
cut: torch's cumsum can reach 1.0 a few ulps early and drop a tail of mass ~1e-7, which the kernel keeps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.dispatch import Impl, use_triton

__all__ = [
    "MAX_VOCAB",
    "SlotSettings",
    "advance_slots",
    "penalise",
    "sample_slots_triton",
    "uniforms",
]

MAX_VOCAB = 1 << 17  # index bits in the composite: 17 (+ 32 key bits < 63)
# The coarse searches stop once at most k + LIST_SLACK (top-p: LIST_SLACK) tokens lie above their threshold; they
# are listed, and every later pass reads only the list (one or two blocks) instead of the whole row.
LIST_SLACK = tl.constexpr(1024)
# Tokens per inner-loop step under the CPU interpreter: small blocks at small V (so tests cover several blocks a
# row), wide ones at large V (the interpreter's cost is per step).
INTERPRET_BLOCK_SMALL, INTERPRET_BLOCK_LARGE, INTERPRET_LARGE_V = 64, 4096, 4096
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 25
# (BLOCK, num_warps): a row per program, so small V wants one block; large V wants wide blocks to stream the row.
# A search pass holds a (BLOCK, 16) tile: 16 to 64 elements a thread (ptxas, sm_90: 254 registers at 64, no spills
# at BLOCK 128 and 1024; 2048 x 16 warps spills a little). Fewer warps a row leave room for more rows an SM.
CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((128, 1), (128, 4), (256, 8), (512, 8), (1024, 8), (1024, 16), (2048, 16))
]


class SlotSettings(NamedTuple):
    """The decode loop's per-slot sampling state that the sampler reads (`inference_svc.runner.SlotState`'s)."""

    blocked: torch.Tensor  # (V,) bool: ids never drawn
    seen: torch.Tensor  # (n_slots, V) bool: ids in the slot's context (the repetition penalty's)
    penalty: torch.Tensor  # (n_slots, 1) float32, 1 = off
    greedy: torch.Tensor  # (n_slots,) bool
    temperature: torch.Tensor  # (n_slots, 1) float32 (any value on greedy slots)
    top_k: torch.Tensor  # (n_slots, 1) int64, V = off
    top_p: torch.Tensor  # (n_slots, 1) float32, 1 = off
    seed: torch.Tensor  # (n_slots,) int64 >= 0


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty: a seen token's logit divided by the row's penalty when positive, multiplied when
    negative. logits (B, V) float32, seen (B, V) bool, penalty (B, 1) float32 (1 = off). The kernels' rule (here, so
    that kernels/accept_round.py's reference can use it; model.sampling re-exports it)."""
    hit = seen & (penalty != 1.0)
    return torch.where(hit, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


_M32 = 0xFFFFFFFF


def _mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 values in [0, 2**32). The multipliers are below
    2**31, so every product fits in int64: the same bits on every device, in eager mode and in a CUDA graph."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One U[0, 1) draw per row from a counter-based generator: a hash of (seed, counter), where counter is the
    position of the token being drawn. seeds, counters (B,) int64 >= 0 -> (B,) float32 on their device (any shapes
    that broadcast: one draw per element). Here, beside its Triton twin `_uniform`, so that kernels' references can
    use it; model.sampling re-exports it.

    A row's draw depends on its own seed and position only (never on what else is in the batch, nor on how many
    draws came before), and it is pure tensor arithmetic, so the serving engine draws inside its captured decode
    graph exactly what the reference generator draws on the host."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    h = _mix32_tensor(lo ^ _mix32_tensor(hi ^ _mix32_tensor((counters & _M32) ^ 0x9E3779B9)))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: every value exact in float32, below 1


@triton.jit
def _low32(x):
    """x mod 2**32 for int64 x >= 0 (no 32-bit mask literal: its type differs between Triton's backends)."""
    return x - ((x >> 32) << 32)


@triton.jit
def _mix32(x):
    """_mix32_tensor's rounds on int64 values; products stay below 2**63."""
    x = x ^ (x >> 16)
    x = _low32(x * 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _low32(x * 0x5BD1E995)
    return x ^ (x >> 16)


@triton.jit
def _uniform(seed, counter):
    """`uniforms` for one (seed, counter): int64 scalars >= 0 -> float32 in [0, 1), 24 bits."""
    golden = tl.full((), 0x9E3779B9, tl.int64)
    lo = _low32(seed)
    hi = _low32(seed >> 32)
    h = _mix32(lo ^ _mix32(hi ^ _mix32(_low32(counter) ^ golden)))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _composite(x, offs, mask, IDX_BITS: tl.constexpr):
    """The rank order as one int64 per token (larger = earlier): monotone key of x, then the lower index first.
    Positions past V get -1 (below every real token)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == +0.0 to torch's sort
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits < 0, -1 - bits, bits + 2147483648)  # float32 order as uint32
    comp = (key << IDX_BITS) | ((1 << IDX_BITS) - 1 - offs.to(tl.int64))
    return tl.where(mask, comp, -1)


@triton.jit
def _float_of(comp, IDX_BITS: tl.constexpr):
    """The float32 x back from a composite (the inverse of _composite's key)."""
    key = comp >> IDX_BITS
    bits = tl.where(key >= 2147483648, key - 2147483648, -1 - key)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _load_block(
    x_row, c_row, n, listed, start, cut, m, z, IDX_BITS: tl.constexpr, BLOCK: tl.constexpr, COUNT: tl.constexpr
):
    """Tokens start.. start + BLOCK of a row, as composites and their weights in a search: 1 (counting) or the
    probability exp(x - m) / z, zero below the cut (and past n). The row is either the whole scaled row x_row
    (listed == 0, n = V) or the list of the composites at c_row that top-k's coarse search kept (listed == 1)."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    from_list = (tl.zeros([BLOCK], tl.int32) + listed) != 0
    x = tl.load(x_row + offs, mask=mask & (from_list == 0), other=float("-inf"))
    comp = _composite(x, offs, mask, IDX_BITS)
    listed_comp = tl.load(c_row + offs, mask=mask & from_list, other=-1)
    comp = tl.where(from_list, listed_comp, comp)
    x = tl.where(from_list, _float_of(listed_comp, IDX_BITS), x)
    if COUNT:
        w = tl.where(mask & (comp >= cut), 1.0, 0.0)
    else:
        w = tl.where(mask & (comp >= cut), tl.exp(x - m) / z, 0.0)
    return comp, w


@triton.jit
def _search(
    x_row,
    c_row,
    n,
    listed,
    lo,
    hi,
    cut,
    m,
    z,
    target,
    IDX_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    COUNT: tl.constexpr,
    STRICT: tl.constexpr,
    EARLY: tl.constexpr,
):
    """The largest T in [lo, hi) with W(T) >= target (> with STRICT), where W(T) is the weight of the tokens whose
    composite is >= T, given W(lo) meets the target and W(hi) does not (lo = -1, hi = 0: none does). W only steps
    at tokens' composites, so T is one of them. Returns the final (lo, hi). With EARLY it stops as soon as at most
    LIST_SLACK tokens (COUNT: target + LIST_SLACK) lie at or above lo: they are listed, and the search resumes from
    (lo, hi) over the list."""
    j = tl.arange(0, 16).to(tl.int64)
    stop = -1.0
    if EARLY:
        stop = LIST_SLACK + (target if COUNT else 0.0)
    above = tl.full((), float("inf"), tl.float32)  # tokens at or above lo (when EARLY)
    while (hi - lo > 1) & (above > stop):
        t = lo + ((hi - lo) * j) // 16  # (16,) thresholds, t[0] = lo
        acc = tl.zeros((16,), tl.float64)  # float64: many near-equal probabilities must not drift past a boundary
        count = tl.zeros((16,), tl.float32)
        for start in range(0, n, BLOCK):
            comp, w = _load_block(x_row, c_row, n, listed, start, cut, m, z, IDX_BITS, BLOCK, COUNT)
            ge = comp[:, None] >= t[None, :]
            acc += tl.sum(tl.where(ge, w[:, None].to(tl.float64), 0.0), axis=0)
            if EARLY and not COUNT:
                count += tl.sum(tl.where(ge, 1.0, 0.0), axis=0)
        if STRICT:
            hit = acc > target
        else:
            hit = acc >= target
        if EARLY:
            if COUNT:
                count = acc.to(tl.float32)
            above = tl.min(tl.where(hit, count, float("inf")), axis=0)  # counts fall as t rises: at the new lo
        new_lo = tl.max(tl.where(hit, t, -1), axis=0)
        new_hi = tl.min(tl.where(hit, hi, t), axis=0)
        hi = tl.where(new_lo < 0, 0, new_hi)
        lo = new_lo
    return lo, hi


@triton.jit
def _list_row(x_row, c_row, V, cut, IDX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Writes the composites >= cut of the whole row to c_row, in index order; returns how many."""
    n = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        comp, keep = _load_block(x_row, c_row, V, 0, start, cut, 0.0, 1.0, IDX_BITS, BLOCK, True)
        keep = keep.to(tl.int32)
        tl.store(c_row + n + tl.cumsum(keep, axis=0) - 1, comp, mask=keep != 0)
        n += tl.sum(keep, axis=0)
    return n


@triton.jit
def _pass_total(x_row, c_row, n, listed, cut, m, z, IDX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Over the tokens at or above the cut: the sum of their probabilities, and the lowest composite whose
    probability is positive (torch's last kept token, where a draw that rounds past the total lands)."""
    total = tl.zeros((), tl.float64)
    lowest = tl.zeros((), tl.int64) + (1 << 62)
    for start in range(0, n, BLOCK):
        comp, p = _load_block(x_row, c_row, n, listed, start, cut, m, z, IDX_BITS, BLOCK, False)
        total += tl.sum(p.to(tl.float64), axis=0)
        lowest = tl.minimum(lowest, tl.min(tl.where(p > 0.0, comp, 1 << 62), axis=0))
    return total.to(tl.float32), lowest


@triton.jit(do_not_specialize=["batch_bucket"])
def _sample_kernel(
    logits_ptr,  # (B, V) float32, row stride stride_l
    stride_l,
    x_ptr,  # (B, V) float32 scratch: penalised logits / temperature
    c_ptr,  # (B, V) int64 scratch: top-k's list of composites
    slots_ptr,  # (B,) int64: the slot of each row
    counters_ptr,  # (B,) int64: the draw's counter (the new token's position)
    blocked_ptr,  # (V,) uint8: ids never drawn
    seen_ptr,  # (n_slots, V) uint8, row stride stride_s
    stride_s,
    penalty_ptr,  # (n_slots,) float32 (1 = off)
    greedy_ptr,  # (n_slots,) uint8
    temperature_ptr,  # (n_slots,) float32
    top_k_ptr,  # (n_slots,) int64 (V = off)
    top_p_ptr,  # (n_slots,) float32
    seed_ptr,  # (n_slots,) int64
    out_ptr,  # (B,) int64
    V,
    batch_bucket,  # next_power_of_2(B): an autotune key only, never read (one row wants wide blocks, many rows narrow)
    IDX_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b)
    penalty = tl.load(penalty_ptr + slot)
    temperature = tl.load(temperature_ptr + slot)
    l_row = logits_ptr + b.to(tl.int64) * stride_l
    x_row = x_ptr + b.to(tl.int64) * V
    c_row = c_ptr + b.to(tl.int64) * V
    s_row = seen_ptr + slot * stride_s
    big = V + BLOCK  # an index past every token
    best = tl.full((), float("-inf"), tl.float32)
    arg = tl.zeros((), tl.int32) + big
    first_nan = tl.zeros((), tl.int32) + big
    m = tl.full((), float("-inf"), tl.float32)
    # Pass 1: penalise (model.sampling.penalise), argmax, scale by the temperature into the scratch.
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        logit = tl.load(l_row + offs, mask=mask, other=float("-inf"))
        logit = tl.where(tl.load(blocked_ptr + offs, mask=mask, other=0) != 0, float("-inf"), logit)
        hit = tl.load(s_row + offs, mask=mask, other=0) != 0  # a penalty of 1 changes nothing: x / 1 = x * 1 = x
        scaled = tl.where(logit > 0, tl.math.div_rn(logit, penalty + tl.zeros_like(logit)), logit * penalty)
        logit = tl.where(hit, scaled, logit)
        is_nan = logit != logit
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan & mask, offs, big), axis=0))
        block_max = tl.max(tl.where(is_nan, float("-inf"), logit), axis=0)
        block_arg = tl.min(tl.where(mask & (logit == block_max), offs, big), axis=0)
        take = (block_max > best) | ((block_max == best) & (block_arg < arg))
        arg = tl.where(take, block_arg, arg)
        best = tl.where(take, block_max, best)
        x = tl.math.div_rn(logit, temperature + tl.zeros_like(logit))
        m = tl.maximum(m, tl.max(tl.where(is_nan, float("-inf"), x), axis=0))
        tl.store(x_row + offs, x, mask=mask)
    tl.debug_barrier()  # the scratch row is read by other threads than wrote it
    greedy_token = tl.where(first_nan < big, first_nan, arg)
    degenerate = (first_nan < big) | (m == float("inf")) | (m == float("-inf"))
    token = greedy_token.to(tl.int64)
    if (tl.load(greedy_ptr + slot) == 0) & (degenerate == 0):
        HI = tl.full((), 1 << (32 + IDX_BITS), tl.int64)
        one = tl.full((), 1.0, tl.float32)
        top_k = tl.load(top_k_ptr + slot)
        top_p = tl.load(top_p_ptr + slot)
        cut_k = tl.zeros((), tl.int64)
        lo0 = tl.zeros((), tl.int64)
        n = V + tl.zeros((), tl.int32)  # a tensor whatever V (Triton makes an int argument of 1 a constant)
        listed = tl.zeros((), tl.int32)
        if top_k < V:  # coarse count search, list the tokens above it, finish the cut over the list
            k = top_k.to(tl.float32)
            lo, hi = _search(x_row, c_row, n, listed, lo0, HI, cut_k, m, one, k, IDX_BITS, BLOCK, True, False, True)
            n = _list_row(x_row, c_row, V, lo, IDX_BITS, BLOCK)
            listed = tl.full((), 1, tl.int32)
            tl.debug_barrier()  # the list is read by other threads than wrote it
            cut_k, hi = _search(x_row, c_row, n, listed, lo, hi, cut_k, m, one, k, IDX_BITS, BLOCK, True, False, False)
        z64 = tl.zeros((), tl.float64)
        for start in range(0, n, BLOCK):
            _, e = _load_block(x_row, c_row, n, listed, start, cut_k, m, one, IDX_BITS, BLOCK, False)
            z64 += tl.sum(e.to(tl.float64), axis=0)
        z = z64.to(tl.float32)
        cut = cut_k
        if top_p < 1.0:  # the same, by probability mass: coarse over the whole row (unless listed), list, finish
            lo, hi = _search(x_row, c_row, n, listed, lo0, HI, cut_k, m, z, top_p, IDX_BITS, BLOCK, False, False, True)
            if listed == 0:
                n = _list_row(x_row, c_row, V, lo, IDX_BITS, BLOCK)
                listed = tl.full((), 1, tl.int32)
                tl.debug_barrier()
            cut_p, hi = _search(
                x_row, c_row, n, listed, lo, hi, cut_k, m, z, top_p, IDX_BITS, BLOCK, False, False, False
            )
            cut = tl.maximum(cut_k, cut_p)
        total, lowest = _pass_total(x_row, c_row, n, listed, cut, m, z, IDX_BITS, BLOCK)
        u = _uniform(tl.load(seed_ptr + slot), tl.load(counters_ptr + b))
        pick, _ = _search(x_row, c_row, n, listed, lo0, HI, cut, m, z, u * total, IDX_BITS, BLOCK, False, True, False)
        pick = tl.maximum(pick, lowest)  # a draw past the total takes the last kept token
        token = (1 << IDX_BITS) - 1 - (pick & ((1 << IDX_BITS) - 1))
    tl.store(out_ptr + b, token)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Blocks no wider than the row (rounded up to a power of two, at least the smallest block)."""
    width = max(CONFIGS[0].kwargs["BLOCK"], triton.next_power_of_2({**named_args, **kwargs}["V"]))
    return [c for c in configs if c.kwargs["BLOCK"] <= width]


_sample_kernel_tuned = triton.autotune(
    configs=CONFIGS,
    key=["V", "batch_bucket"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(
        fn, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles
    ),
)(_sample_kernel)


def _check_inputs(logits: torch.Tensor, slots: torch.Tensor, counters: torch.Tensor, seen: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be (B, V) float32, got {tuple(logits.shape)} {logits.dtype}")
    B, V = logits.shape
    if not 1 <= V <= MAX_VOCAB:
        raise ValueError(f"vocabulary V must be in [1, {MAX_VOCAB}], got {V}")
    for name, t in (("slots", slots), ("counters", counters)):
        if t.shape != (B,) or t.dtype != torch.long:
            raise ValueError(f"{name} must be ({B},) int64, got {tuple(t.shape)} {t.dtype}")
    if seen.dim() != 2 or seen.shape[1] != V:
        raise ValueError(f"seen must be (n_slots, V={V}) bool, got {tuple(seen.shape)}")


def sample_slots_triton(
    logits: torch.Tensor, slots: torch.Tensor, counters: torch.Tensor, settings: SlotSettings
) -> torch.Tensor:
    """The kernel: next token (B,) int64 of each row; same arguments as `model.sampling.sample_slots_reference`. One launch, no host sync."""
    blocked, seen, penalty, greedy, temperature, top_k, top_p, seed = settings
    _check_inputs(logits, slots, counters, seen)
    slots, counters = slots.contiguous(), counters.contiguous()  # read at [b]: no expanded (stride-0) views
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    if B == 0:
        return out
    x = torch.empty(B, V, dtype=torch.float32, device=logits.device)  # scratch
    c = torch.empty(B, V, dtype=torch.long, device=logits.device)  # scratch
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    seen = seen if seen.stride(1) == 1 else seen.contiguous()
    args = (
        logits,
        logits.stride(0),
        x,
        c,
        slots,
        counters,
        blocked.view(torch.uint8),
        seen.view(torch.uint8),
        seen.stride(0),
        penalty.reshape(-1),
        greedy.view(torch.uint8).reshape(-1),
        temperature.reshape(-1),
        top_k.reshape(-1),
        top_p.reshape(-1),
        seed.reshape(-1),
        out,
        V,
        triton.next_power_of_2(B),
    )
    idx_bits = max(1, (V - 1).bit_length())
    if logits.is_cuda:
        _sample_kernel_tuned[(B,)](*args, IDX_BITS=idx_bits)
    else:
        block = INTERPRET_BLOCK_SMALL if V <= INTERPRET_LARGE_V else INTERPRET_BLOCK_LARGE
        _sample_kernel[(B,)](*args, IDX_BITS=idx_bits, BLOCK=block)
    return out


# The state update after a step: each row's new token becomes its slot's next input, at its new position, and joins
# the slot's seen mask (full sampling only). One launch instead of torch's two or three index_put kernels.

ADVANCE_BLOCK = 128  # rows per program


@triton.jit
def _advance_kernel(
    token_ptr,  # (n_slots,) int64
    pos_ptr,  # (n_slots,) int64
    seen_ptr,  # (n_slots, V) uint8, row stride stride_s
    stride_s,
    slots_ptr,  # (B,) int64
    tokens_ptr,  # (B,) int64
    positions_ptr,  # (B,) int64
    B,
    FULL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < B
    slot = tl.load(slots_ptr + rows, mask=mask, other=0)
    new = tl.load(tokens_ptr + rows, mask=mask, other=0)
    tl.store(token_ptr + slot, new, mask=mask)
    tl.store(pos_ptr + slot, tl.load(positions_ptr + rows, mask=mask, other=0), mask=mask)
    if FULL:
        tl.store(seen_ptr + slot * stride_s + new, tl.full([BLOCK], 1, tl.uint8), mask=mask)


def advance_slots(
    token: torch.Tensor,
    pos: torch.Tensor,
    seen: torch.Tensor,
    slots: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    full: bool,
    impl: Impl = "auto",
) -> None:
    """token[slots] = tokens, pos[slots] = positions and, when `full`, seen[slots, tokens] = True, in place: one
    Triton launch on CUDA ("auto"), torch's index_put elsewhere ("reference"). token, pos (n_slots,) int64, seen
    (n_slots, V) bool, slots, tokens, positions (B,) int64. A slot listed twice (the scratch slot of padded rows)
    gets one of its rows' values, as with index_put."""
    B = slots.shape[0]
    for name, t in (("tokens", tokens), ("positions", positions)):
        if t.shape != (B,) or t.dtype != torch.long:
            raise ValueError(f"{name} must be ({B},) int64 like slots, got {tuple(t.shape)} {t.dtype}")
    fast = token.is_contiguous() and pos.is_contiguous() and seen.stride(1) == 1
    if not use_triton(impl, token, pos, seen, slots, tokens, positions, supported=fast) or B == 0:
        token[slots] = tokens
        pos[slots] = positions
        if full:
            seen.index_put_((slots, tokens), torch.ones((), dtype=torch.bool, device=seen.device))
        return
    grid = (triton.cdiv(B, ADVANCE_BLOCK),)
    slots, tokens, positions = slots.contiguous(), tokens.contiguous(), positions.contiguous()  # read at [b]
    _advance_kernel[grid](
        token, pos, seen.view(torch.uint8), seen.stride(0), slots, tokens, positions, B, FULL=full, BLOCK=ADVANCE_BLOCK
    )
