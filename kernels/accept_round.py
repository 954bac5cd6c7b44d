"""A speculative round's acceptance in ONE launch: the target's sampling distributions at the k + 1 verify positions
(repetition penalty over each position's context, temperature, top-k, top-p), the rejection tests, the residual and
the new token's inverse-CDF draw, and the context mask after the round, in one Triton program per row.

Why: at batch 1 the GPU round is launch-bound (~2.5 us a kernel on an H200), and the PyTorch chain
(`probabilities` over the b * (k + 1) rows: penalty, sort, top-k, softmax, cumsum, scatter, one-hot; then
`accept_sampled`: gathers, cumprod, residual, the draw; then the mask update) is some 60-80 small launches.

Per row (program), for j = 0 .. k while the drafts stand (a row stops at its first rejection: later positions
change nothing it returns):
    context_j = seen + d_1 .. d_j (penalty only) -> penalised logits -> greedy: one-hot on their argmax; else
    x = logits / temperature, ranked by one int64 per token (`kernels.sampling`'s composite: the float's order, then
    the lower index first = torch's stable descending sort) through `tl.sort`; top-k by rank, softmax, top-p on the
    float64-accumulated cumsum (torch's CPU cumsum accumulates in double: the same float32 values), normalised,
    scattered back to vocabulary order through a per-row scratch row -> p_j (one-hot where the total is not a
    positive number, as the reference falls back) -> d_(j+1) stands while u_j * q_j(d) < p_j(d) -> at the first
    rejection (or j = k) the new token is drawn from norm(max(0, p_j - q_j)) (p_j itself if that has no mass) by
    `kernels.draft_steps.inverse_cdf`'s rule: the first id whose cumulative mass exceeds u * total, never past the
    last id of positive mass.
Tokens equal the reference's except where float rounding (exp, the softmax's sum: the kernel's and torch's differ by
an ulp or so) moves a top-p cut, an accept test or a draw across a boundary: a uniform within ~1e-7 of one.

    accept_round            wrapper; impl="auto": the kernel for CUDA tensors with V <= MAX_VOCAB, else the reference
    accept_round_triton     the kernel
    accept_round_reference  PyTorch: `probabilities` over every position, `accept_sampled`, the mask update
    probabilities           the resident sampler's distribution (the speculative runner's draft loop uses it too)
    accept_sampled          rejection sampling over a batch, given the distributions

The draft loop's steps and the round's uniforms, one launch each instead of ~30 and ~40 (same wrapper / kernel /
reference pattern, the same shared jit pieces: penalty, distribution, inverse-CDF draw):
    draft_sample            one draft step: q = `probabilities` of the masked logits, token = `inverse_cdf(q, u)`,
                            the context with the token (draft_sample_triton / draft_sample_reference)
    uniform_grid            `uniforms(seed[b], pos[b] + offsets[j])` over a (B, N) grid (the kernel / its reference)

The round's tail after the verify (and the acceptance) in one launch instead of ~18 (greedy) / ~10 (sampled):
    finish_round            greedy rounds: the target's argmax and `accept_greedy`; then each row's next input and
                            position (and the draft's carried token) into the slot state, count and tokens into the
                            round's output (finish_round_triton / finish_round_reference)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.dispatch import Impl, repeat_rows, use_triton
from kernels.draft_steps import inverse_cdf
from kernels.sampling import _composite, _float_of, _uniform, penalise, uniforms

__all__ = [
    "MAX_VOCAB",
    "DraftInputs",
    "FinishInputs",
    "RoundInputs",
    "accept_greedy",
    "accept_round",
    "accept_round_reference",
    "accept_round_triton",
    "accept_sampled",
    "draft_sample",
    "draft_sample_reference",
    "draft_sample_triton",
    "finish_round",
    "finish_round_reference",
    "finish_round_triton",
    "num_warps",
    "probabilities",
    "uniform_grid",
    "uniform_grid_reference",
]

MAX_VOCAB = 8192  # a row's k + 1 distributions are computed in one register tile each (padded to a power of two)
# One program holds a row: the sort and the scans over VP values, at most VALUES_PER_THREAD a thread (4 warps at
# least). sm_90 builds (2026-11-30, kernels/accept_round_compile_test.py): vocab 65 and 256 at 4 warps, 72-96
# registers, no stack; 8192 at 16 warps, 128 registers (the cap at 16 warps), 232-280 B of stack (at 4 warps, 64
# values a thread: 255 registers, 1.3 KB).
VALUES_PER_THREAD = 16


def num_warps(vp: int) -> int:
    """Warps of the program over a padded vocabulary of vp ids: 4, more past 16 values a thread (at most 16)."""
    return min(16, max(4, vp // (32 * VALUES_PER_THREAD)))


def probabilities(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    penalty: torch.Tensor | None,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """The distribution the resident sampler draws each row's token from (`model.sampling.sample_rows` after
    `penalise`): logits (N, V) float32 (blocked ids at -inf), seen (N, V) bool, penalty / temperature / top_p (N, 1)
    float32 (seen and penalty None: no row penalises), top_k (N, 1) long, greedy (N,) bool. Returns (N, V) float32 in
    vocabulary order; greedy rows (and rows whose distribution is not a number, as the sampler falls back) are
    one-hot on the argmax."""
    if seen is not None:
        logits = penalise(logits, seen, penalty)
    V = logits.shape[-1]
    ranked, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)  # (N, V)
    ranked = ranked.masked_fill(torch.arange(V, device=logits.device) >= top_k, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)  # top-p: the first token always stays
    total = probs.sum(dim=-1, keepdim=True)
    probs = torch.zeros_like(probs).scatter_(1, order, probs / total)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    degenerate = ~torch.isfinite(total[:, 0]) | (total[:, 0] <= 0)
    return torch.where((greedy | degenerate)[:, None], one_hot, probs)


def accept_sampled(
    drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, u_accept: torch.Tensor, u_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling over a batch: drafts (B, k) drawn from q (B, k, V); p (B, k + 1, V) the target's
    distributions at the drafts' positions and one past; u_accept (B, k) the accept tests' uniforms, u_new (B, k + 1)
    the new token's, by where it lands. Returns (accepted (B,), tokens (B, k + 1)): the first `accepted` drafts, then
    a draw from norm(max(0, p - q)) at the first rejection, or from p's last row."""
    B, k, V = q.shape
    d = drafts[..., None]
    ok = u_accept * q.gather(2, d)[..., 0] < p[:, :k].gather(2, d)[..., 0]  # u < p(d) / q(d), and q(d) > 0
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (B,)
    row = accepted[:, None, None].expand(B, 1, V)
    residual = (p - torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)).clamp_(min=0).gather(1, row)[:, 0]  # (B, V)
    # A rejection leaves mass where p > q; should rounding leave none, draw from p itself.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p.gather(1, row)[:, 0])
    token = inverse_cdf(residual, u_new.gather(1, accepted[:, None])[:, 0])
    tokens = torch.cat([drafts, token[:, None]], dim=1).scatter_(1, accepted[:, None], token[:, None])
    return accepted, tokens


class RoundInputs(NamedTuple):
    """One `accept_round` call's tensors (see there), as its two implementations take them."""

    logits: torch.Tensor  # (B, k + 1, V) float32, blocked ids at -inf
    drafts: torch.Tensor  # (B, k) long
    q: torch.Tensor  # (B, k, V) float32
    u_accept: torch.Tensor  # (B, k) float32
    u_new: torch.Tensor  # (B, k + 1) float32
    greedy: torch.Tensor  # (B,) bool
    temperature: torch.Tensor  # (B, 1) float32
    top_k: torch.Tensor  # (B, 1) long
    top_p: torch.Tensor  # (B, 1) float32
    seen: torch.Tensor | None  # (B, V) bool: the context through x_n
    penalty: torch.Tensor | None  # (B, 1) float32


def accept_round(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor,
    u_accept: torch.Tensor,
    u_new: torch.Tensor,
    *,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seen: torch.Tensor | None = None,
    penalty: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, ...]:
    """A sampled speculative round's acceptance (`inference_svc.speculative_resident`): the target's logits (B, k + 1,
    V) float32 at the drafts' positions and one past (blocked ids at -inf), drafts (B, k) long drawn from q (B, k, V)
    float32, u_accept (B, k) and u_new (B, k + 1) float32 uniforms, each row's sampler settings greedy (B,) bool,
    temperature / top_p (B, 1) float32, top_k (B, 1) long; seen (B, V) bool the context through the round's first
    input and penalty (B, 1) float32 (both None when no row penalises; the context before position j is seen plus
    d_1 .. d_j; a caller that has built those contexts may pass them all, seen (B, k + 1, V), which the reference
    then reads instead of rebuilding: the kernel reads the first). Returns (accepted (B,) long, tokens (B, k + 1)
    long: the drafts with the new token at `accepted` and at k) and, with seen, the context after the round (B, V)
    bool: seen, the accepted drafts, the new token."""
    a = RoundInputs(logits, drafts, q, u_accept, u_new, greedy, temperature, top_k, top_p, seen, penalty)
    _check_args(a)
    supported = logits.shape[-1] <= MAX_VOCAB
    if use_triton(impl, logits, drafts, q, u_accept, u_new, greedy, temperature, top_k, top_p, supported=supported):
        return accept_round_triton(a)
    return accept_round_reference(a)


def _check_args(a: RoundInputs) -> None:
    if a.logits.dim() != 3 or a.logits.dtype != torch.float32 or a.logits.shape[1] < 2:
        raise ValueError(
            f"logits must be (B, k + 1, V) float32 with k >= 1, got {tuple(a.logits.shape)} {a.logits.dtype}"
        )
    b, n, V = a.logits.shape
    k = n - 1
    want = dict(
        drafts=((b, k), (torch.long,)),
        q=((b, k, V), (torch.float32,)),
        u_accept=((b, k), (torch.float32,)),
        u_new=((b, n), (torch.float32,)),
        greedy=((b,), (torch.bool,)),
        temperature=((b, 1), (torch.float32,)),
        top_k=((b, 1), (torch.long,)),
        top_p=((b, 1), (torch.float32,)),
        seen=(((b, V), (b, n, V)), (torch.bool,)),
        penalty=((b, 1), (torch.float32,)),
    )
    _check_fields(a._asdict(), want)


def _check_fields(
    given: dict[str, torch.Tensor | None], want: dict[str, tuple], optional: tuple[str, ...] = ("seen", "penalty")
) -> None:
    """Each named tensor against its (shape or shapes, dtypes): a ValueError naming the first that differs. Those in
    `optional` may be None (seen and penalty, when given, both together)."""
    for name, (shape, dtypes) in want.items():
        t = given[name]
        if t is None and name in optional:
            continue
        shapes = shape if isinstance(shape[0], tuple) else (shape,)
        if not isinstance(t, torch.Tensor) or t.shape not in shapes or t.dtype not in dtypes:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)
            allowed = " or ".join(map(str, dtypes))
            raise ValueError(f"{name} must be {' or '.join(map(str, shapes))} {allowed}, got {got}")
    if "seen" in given and (given["seen"] is None) != (given["penalty"] is None):
        raise ValueError("seen and penalty go together: both tensors (some row penalises) or both None")


def accept_round_reference(a: RoundInputs) -> tuple[torch.Tensor, ...]:
    """`probabilities` over all b * (k + 1) positions at once, `accept_sampled`, then the context mask."""
    b, n, V = a.logits.shape
    settings = (repeat_rows(s, n) for s in (a.greedy, a.temperature, a.top_k, a.top_p))
    seen_all = a.seen if a.seen is not None and a.seen.dim() == 3 else None  # the caller's contexts
    if a.seen is not None and seen_all is None:  # the context before each position: seen, then the drafts one by one
        contexts = [a.seen]
        for j in range(n - 1):
            contexts.append(contexts[-1].scatter(1, a.drafts[:, j : j + 1], True))
        seen_all = torch.stack(contexts, dim=1)  # (b, k + 1, V)
    p = probabilities(
        a.logits.flatten(0, 1),
        seen_all.flatten(0, 1) if seen_all is not None else None,
        repeat_rows(a.penalty, n) if seen_all is not None else None,
        *settings,
    ).view(b, n, V)
    accepted, tokens = accept_sampled(a.drafts, a.q, p, a.u_accept, a.u_new)
    if seen_all is None:
        return accepted, tokens
    kept = seen_all.gather(1, accepted[:, None, None].expand(b, 1, V))[:, 0]  # the context through the accepted drafts
    return accepted, tokens, kept.scatter(1, tokens[:, -1:], True)  # and the new token (tokens[:, k] is it)


@triton.jit
def _argmax(logit, offs, in_v, VP: tl.constexpr):
    """torch.argmax of the row (VP,), ids < V: its first NaN, else its first maximum (0 where all are -inf)."""
    is_nan = logit != logit
    first_nan = tl.min(tl.where(is_nan & in_v, offs, VP), axis=0)
    best = tl.max(tl.where(is_nan | (in_v == 0), float("-inf"), logit), axis=0)
    arg = tl.min(tl.where(in_v & (logit == best), offs, VP), axis=0)
    return tl.where(first_nan < VP, first_nan, arg)


@triton.jit
def _argmax_one_hot(logit, offs, in_v, VP: tl.constexpr):
    """One-hot (VP,) on torch.argmax of the row: its first NaN, else its first maximum."""
    return tl.where(offs == _argmax(logit, offs, in_v, VP), 1.0, 0.0)


@triton.jit
def _sampled_distribution(
    logit, offs, in_v, temperature, top_k, top_p, p_row, IDX_BITS: tl.constexpr, VP: tl.constexpr
):
    """`probabilities` of one sampled row in vocabulary order (VP,) float32 (0 past V), and its total before the
    normalisation (not a positive number: the caller falls back to the one-hot). p_row: a (VP,) scratch row."""
    x = tl.math.div_rn(logit, temperature + tl.zeros_like(logit))
    ranked = tl.sort(_composite(x, offs, in_v, IDX_BITS), descending=True)  # (VP,): descending, ties by lower id
    ids = (1 << IDX_BITS) - 1 - (ranked & ((1 << IDX_BITS) - 1))  # the ids in rank order (offs: the ranks)
    real = ranked >= 0  # padded entries (-1) sort last
    xs = tl.where(real & (offs < top_k), _float_of(ranked, IDX_BITS), float("-inf"))
    e = tl.exp(xs - tl.max(xs, axis=0))
    probs = tl.math.div_rn(e, tl.sum(e, axis=0) + tl.zeros_like(e))
    mass = tl.cumsum(probs.to(tl.float64), axis=0).to(tl.float32)  # as torch's CPU cumsum: double, then rounded
    probs = tl.where(mass - probs >= top_p, 0.0, probs)  # top-p: the first token always stays
    total = tl.sum(probs, axis=0)
    tl.debug_barrier()  # every thread has read the scratch row's last use before it is rewritten
    tl.store(p_row + ids, tl.math.div_rn(probs, total + tl.zeros_like(probs)), mask=real)
    tl.debug_barrier()  # written by the thread holding a rank, read by the thread holding the id
    return tl.load(p_row + offs, mask=in_v, other=0.0), total


@triton.jit
def _row_settings(greedy_ptr, temperature_ptr, top_k_ptr, top_p_ptr, row):
    """Row `row`'s sampler settings: greedy (bool), temperature, top_k, top_p, from (B,) uint8 / f32 / i64 / f32."""
    greedy = tl.load(greedy_ptr + row) != 0
    return greedy, tl.load(temperature_ptr + row), tl.load(top_k_ptr + row), tl.load(top_p_ptr + row)


@triton.jit
def _penalised(logit, context, penalty):
    """`penalise` on one row (VP,): a penalty of 1 changes nothing (x / 1 = x * 1 = x), so no test for it."""
    scaled = tl.where(logit > 0, tl.math.div_rn(logit, penalty + tl.zeros_like(logit)), logit * penalty)
    return tl.where(context, scaled, logit)


@triton.jit
def _row_distribution(
    logit, offs, in_v, greedy, temperature, top_k, top_p, p_row, IDX_BITS: tl.constexpr, VP: tl.constexpr
):
    """`probabilities` of one row (VP,) float32 in vocabulary order: the one-hot on the argmax for a greedy row or
    one whose sampled total is not a positive number, else the sampled distribution. p_row: a scratch row, ids < V."""
    p = _argmax_one_hot(logit, offs, in_v, VP)
    if greedy == 0:
        sampled, total = _sampled_distribution(logit, offs, in_v, temperature, top_k, top_p, p_row, IDX_BITS, VP)
        degenerate = (total != total) | (total == float("inf")) | (total <= 0.0)
        p = tl.where(degenerate, p, sampled)
    return p


@triton.jit
def _inverse_cdf(probs, u, offs, in_v):
    """`kernels.draft_steps.inverse_cdf` on one row (VP,) >= 0: the first id whose cumulative mass (float64, as
    torch's CPU cumsum) exceeds u * total, never past the last id of positive mass. Returns an int64 scalar."""
    cdf = tl.cumsum(probs.to(tl.float64), axis=0).to(tl.float32)
    pick = tl.sum((in_v & (cdf <= u * tl.max(cdf, axis=0))).to(tl.int32), axis=0)
    last = tl.max(tl.where(probs > 0.0, offs, 0), axis=0)
    return tl.minimum(pick, last).to(tl.int64)


@triton.jit
def _accept_round_kernel(
    logits_ptr,  # (B, K + 1, V) float32, ids contiguous
    stride_lb,
    stride_lj,
    drafts_ptr,  # (B, K) int64
    stride_d,
    q_ptr,  # (B, K, V) float32, ids contiguous
    stride_qb,
    stride_qj,
    ua_ptr,  # (B, K) float32, the accept tests' uniforms
    stride_ua,
    un_ptr,  # (B, K + 1) float32, the new token's, by where it lands
    stride_un,
    greedy_ptr,  # (B,) uint8
    temperature_ptr,  # (B,) float32
    top_k_ptr,  # (B,) int64
    top_p_ptr,  # (B,) float32
    seen_ptr,  # (B, V) uint8 (PENALTY)
    stride_s,
    penalty_ptr,  # (B,) float32 (PENALTY)
    p_ptr,  # (B, VP) float32 scratch
    accepted_ptr,  # (B,) int64 out
    tokens_ptr,  # (B, K + 1) int64 out
    context_ptr,  # (B, V) uint8 out (PENALTY)
    K: tl.constexpr,
    KP: tl.constexpr,  # next_power_of_2(K + 1)
    V: tl.constexpr,
    VP: tl.constexpr,
    IDX_BITS: tl.constexpr,
    PENALTY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, VP)
    in_v = offs < V
    greedy, temperature, top_k, top_p = _row_settings(greedy_ptr, temperature_ptr, top_k_ptr, top_p_ptr, row)
    p_row = p_ptr + row * VP
    context = offs < 0  # (VP,) bool: the context (PENALTY)
    penalty = 1.0
    if PENALTY:
        context = tl.load(seen_ptr + row * stride_s + offs, mask=in_v, other=0) != 0
        penalty = tl.load(penalty_ptr + row)
    accepted = tl.zeros((), tl.int32)
    token = tl.zeros((), tl.int64)
    going = tl.full((), 1, tl.int32)
    for j in range(K + 1):
        if going != 0:
            logit = tl.load(logits_ptr + row * stride_lb + j * stride_lj + offs, mask=in_v, other=float("-inf"))
            if PENALTY:
                logit = _penalised(logit, context, penalty)
            p = _row_distribution(logit, offs, in_v, greedy, temperature, top_k, top_p, p_row, IDX_BITS, VP)
            drafting = j < K  # position K has no draft: its token is drawn from p itself
            d = tl.load(drafts_ptr + row * stride_d + j, mask=drafting, other=0)
            q = tl.load(q_ptr + row * stride_qb + j * stride_qj + offs, mask=in_v & drafting, other=0.0)
            u = tl.load(ua_ptr + row * stride_ua + j, mask=drafting, other=1.0)
            at_d = offs == d
            ok = drafting & (u * tl.sum(tl.where(at_d, q, 0.0), axis=0) < tl.sum(tl.where(at_d, p, 0.0), axis=0))
            if ok:
                accepted += 1
                if PENALTY:
                    context = context | at_d
            else:  # the new token: inverse CDF over norm(max(0, p - q)) (p itself where that has no mass)
                residual = tl.maximum(p - q, 0.0)
                residual = tl.where(tl.max(residual, axis=0) > 0.0, residual, p)
                token = _inverse_cdf(residual, tl.load(un_ptr + row * stride_un + j), offs, in_v)
                going = tl.zeros((), tl.int32)
    tl.store(accepted_ptr + row, accepted.to(tl.int64))
    offs_k = tl.arange(0, KP)
    drafts = tl.load(drafts_ptr + row * stride_d + offs_k, mask=offs_k < K, other=0)
    tokens = tl.where((offs_k == accepted) | (offs_k == K), token, drafts)
    tl.store(tokens_ptr + row * (K + 1) + offs_k, tokens, mask=offs_k <= K)
    if PENALTY:
        context = context | (offs == token)
        tl.store(context_ptr + row * V + offs, context.to(tl.uint8), mask=in_v)


def accept_round_triton(a: RoundInputs) -> tuple[torch.Tensor, ...]:
    """The kernel: one program per row, no host sync."""
    b, n, V = a.logits.shape
    k, device = n - 1, a.logits.device
    vp = triton.next_power_of_2(V)
    accepted = torch.empty(b, dtype=torch.long, device=device)
    tokens = torch.empty(b, n, dtype=torch.long, device=device)
    penalised = a.seen is not None
    context = torch.empty(b, V, dtype=torch.bool, device=device) if penalised else None
    if b == 0:
        return (accepted, tokens, context) if penalised else (accepted, tokens)
    logits = a.logits if a.logits.stride(2) == 1 else a.logits.contiguous()
    q = a.q if a.q.stride(2) == 1 else a.q.contiguous()
    drafts, u_accept, u_new = (t if t.stride(1) == 1 else t.contiguous() for t in (a.drafts, a.u_accept, a.u_new))
    scratch = torch.empty(b, vp, dtype=torch.float32, device=device)
    seen = a.seen[:, 0] if penalised and a.seen.dim() == 3 else a.seen  # the context through x_n
    seen_u8, stride_s, penalty, out_u8 = _penalty_args(seen, a.penalty, context, accepted)
    _accept_round_kernel[(b,)](
        logits, logits.stride(0), logits.stride(1), drafts, drafts.stride(0),
        q, q.stride(0), q.stride(1), u_accept, u_accept.stride(0), u_new, u_new.stride(0),
        *_settings_args(a.greedy, a.temperature, a.top_k, a.top_p),
        seen_u8, stride_s, penalty, scratch, accepted, tokens, out_u8,
        K=k, KP=triton.next_power_of_2(n), V=V, VP=vp, IDX_BITS=max(1, (vp - 1).bit_length()),
        PENALTY=penalised, num_warps=num_warps(vp),
    )  # fmt: skip
    return (accepted, tokens, context) if penalised else (accepted, tokens)


def _settings_args(greedy: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple:
    """The rows' sampler settings as the kernels read them, at [row]: (B,) uint8 / f32 / i64 / f32, contiguous."""
    b = greedy.shape[0]
    return tuple(t.reshape(b).contiguous() for t in (greedy.view(torch.uint8), temperature, top_k, top_p))


def _penalty_args(
    seen: torch.Tensor | None, penalty: torch.Tensor | None, out: torch.Tensor | None, unused: torch.Tensor
) -> tuple:
    """A PENALTY kernel's (seen as uint8 with unit id stride, its row stride, penalty (B,), the output mask as uint8);
    without a penalty (seen None) `unused` stands in for the three pointers, which the kernel then never reads."""
    if seen is None:
        return unused, 0, unused, unused
    seen = seen if seen.stride(1) == 1 else seen.contiguous()
    return seen.view(torch.uint8), seen.stride(0), penalty.reshape(seen.shape[0]).contiguous(), out.view(torch.uint8)


# --- The draft's per-step sampling in one launch: its distribution q (what the acceptance reads), its token, the
# context after it. The PyTorch chain it replaces (`probabilities`, `inverse_cdf`, the mask's scatter) is ~30 launches
# a draft step; the round's uniforms (`uniforms`, ~40 elementwise launches) become `uniform_grid`'s one.

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DraftInputs(NamedTuple):
    """One `draft_sample` call's tensors (see there), as its two implementations take them."""

    logits: torch.Tensor  # (B, V) float32 / bfloat16 / float16, ids contiguous
    blocked: torch.Tensor  # (V,) bool: ids never drawn
    u: torch.Tensor  # (B,) float32
    greedy: torch.Tensor  # (B,) bool
    temperature: torch.Tensor  # (B, 1) float32
    top_k: torch.Tensor  # (B, 1) long
    top_p: torch.Tensor  # (B, 1) float32
    seen: torch.Tensor | None  # (B, V) bool: the context before this step
    penalty: torch.Tensor | None  # (B, 1) float32


def draft_sample(
    logits: torch.Tensor,
    blocked: torch.Tensor,
    u: torch.Tensor,
    *,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seen: torch.Tensor | None = None,
    penalty: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One draft step's sampling (`inference_svc.speculative_resident`'s draft loop): the draft's logits (B, V) in
    float32, bfloat16 or float16 (any row stride: `forward_cached(...)[:, 0]`), blocked (V,) bool (ids set to -inf),
    u (B,) float32 the rows' uniforms, the sampler settings greedy (B,) bool, temperature / top_p (B, 1) float32,
    top_k (B, 1) long, and seen (B, V) bool with penalty (B, 1) float32 (both None: no row penalises). Returns (q
    (B, V) float32: `probabilities` of the masked float32 logits, token (B,) long: `inverse_cdf(q, u)`, seen_after
    (B, V) bool: seen with the token set, None without seen). impl: as `accept_round`'s (the kernel needs V <=
    MAX_VOCAB). No host sync, allocations by shape only: capturable in a CUDA graph."""
    a = DraftInputs(logits, blocked, u, greedy, temperature, top_k, top_p, seen, penalty)
    _check_draft_args(a)
    supported = logits.shape[-1] <= MAX_VOCAB
    if use_triton(impl, logits, blocked, u, greedy, temperature, top_k, top_p, supported=supported):
        return draft_sample_triton(a)
    return draft_sample_reference(a)


def _check_draft_args(a: DraftInputs) -> None:
    if not isinstance(a.logits, torch.Tensor) or a.logits.dim() != 2 or a.logits.dtype not in LOGIT_DTYPES:
        got = f"{tuple(a.logits.shape)} {a.logits.dtype}" if isinstance(a.logits, torch.Tensor) else repr(a.logits)
        raise ValueError(f"logits must be (B, V) with dtype one of {LOGIT_DTYPES}, got {got}")
    b, V = a.logits.shape
    if V < 1:
        raise ValueError(f"logits must have a vocabulary V >= 1, got {V}")
    want = dict(
        blocked=((V,), (torch.bool,)),
        u=((b,), (torch.float32,)),
        greedy=((b,), (torch.bool,)),
        temperature=((b, 1), (torch.float32,)),
        top_k=((b, 1), (torch.long,)),
        top_p=((b, 1), (torch.float32,)),
        seen=((b, V), (torch.bool,)),
        penalty=((b, 1), (torch.float32,)),
    )
    _check_fields(a._asdict(), want)


def draft_sample_reference(a: DraftInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The PyTorch chain the draft loop ran: mask, `probabilities`, `inverse_cdf`, the mask's scatter."""
    logits = a.logits.float().masked_fill(a.blocked, float("-inf"))  # (B, V)
    q = probabilities(logits, a.seen, a.penalty, a.greedy, a.temperature, a.top_k, a.top_p)
    token = inverse_cdf(q, a.u)
    seen_after = a.seen.scatter(1, token[:, None], True) if a.seen is not None else None
    return q, token, seen_after


@triton.jit
def _draft_sample_kernel(
    logits_ptr,  # (B, V) float32 / bfloat16 / float16, ids contiguous
    stride_l,
    blocked_ptr,  # (V,) uint8
    u_ptr,  # (B,) float32, stride stride_u (a column of the round's uniforms)
    stride_u,
    greedy_ptr,  # (B,) uint8
    temperature_ptr,  # (B,) float32
    top_k_ptr,  # (B,) int64
    top_p_ptr,  # (B,) float32
    seen_ptr,  # (B, V) uint8 (PENALTY)
    stride_s,
    penalty_ptr,  # (B,) float32 (PENALTY)
    q_ptr,  # (B, V) float32 out, contiguous; each row is its own scratch row first
    token_ptr,  # (B,) int64 out
    seen_out_ptr,  # (B, V) uint8 out, contiguous (PENALTY)
    V: tl.constexpr,
    VP: tl.constexpr,
    IDX_BITS: tl.constexpr,
    PENALTY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, VP)
    in_v = offs < V
    logit = tl.load(logits_ptr + row * stride_l + offs, mask=in_v, other=float("-inf")).to(tl.float32)
    logit = tl.where(tl.load(blocked_ptr + offs, mask=in_v, other=0) != 0, float("-inf"), logit)
    context = offs < 0  # (VP,) bool (PENALTY)
    if PENALTY:
        context = tl.load(seen_ptr + row * stride_s + offs, mask=in_v, other=0) != 0
        logit = _penalised(logit, context, tl.load(penalty_ptr + row))
    q_row = q_ptr + row * V  # the sampled distribution's scratch row: it writes ids < V only
    greedy, temperature, top_k, top_p = _row_settings(greedy_ptr, temperature_ptr, top_k_ptr, top_p_ptr, row)
    q = _row_distribution(logit, offs, in_v, greedy, temperature, top_k, top_p, q_row, IDX_BITS, VP)
    tl.store(q_row + offs, q, mask=in_v)  # each thread rewrites the ids it read back: no barrier needed
    token = _inverse_cdf(q, tl.load(u_ptr + row * stride_u), offs, in_v)
    tl.store(token_ptr + row, token)
    if PENALTY:
        tl.store(seen_out_ptr + row * V + offs, (context | (offs == token)).to(tl.uint8), mask=in_v)


def draft_sample_triton(a: DraftInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel: one program per row, one launch, no host sync."""
    b, V = a.logits.shape
    device = a.logits.device
    vp = triton.next_power_of_2(V)
    q = torch.empty(b, V, dtype=torch.float32, device=device)
    token = torch.empty(b, dtype=torch.long, device=device)
    penalised = a.seen is not None
    seen_after = torch.empty(b, V, dtype=torch.bool, device=device) if penalised else None
    if b == 0:
        return q, token, seen_after
    logits = a.logits if a.logits.stride(1) == 1 else a.logits.contiguous()
    seen_u8, stride_s, penalty, out_u8 = _penalty_args(a.seen, a.penalty, seen_after, token)
    _draft_sample_kernel[(b,)](
        logits, logits.stride(0), a.blocked.contiguous().view(torch.uint8), a.u, a.u.stride(0),
        *_settings_args(a.greedy, a.temperature, a.top_k, a.top_p),
        seen_u8, stride_s, penalty, q, token, out_u8,
        V=V, VP=vp, IDX_BITS=max(1, (vp - 1).bit_length()), PENALTY=penalised, num_warps=num_warps(vp),
    )  # fmt: skip
    return q, token, seen_after


UNIFORM_BLOCK = 256  # draws a program at most (a round takes 3k + 1 a row: one program a row)


def uniform_grid(seed: torch.Tensor, pos: torch.Tensor, offsets: torch.Tensor, impl: Impl = "auto") -> torch.Tensor:
    """Every draw of a round at once: u[b, j] = `uniforms(seed[b], pos[b] + offsets[j])`, bit for bit. seed, pos (B,)
    int64, offsets (N,) int64, on one device -> (B, N) float32. One launch on CUDA ("auto"), torch's ~40
    elementwise launches ("reference") elsewhere."""
    for name, t in (("seed", seed), ("pos", pos), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.long:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {got}")
    if pos.shape != seed.shape:
        raise ValueError(f"pos must be {tuple(seed.shape)} like seed, got {tuple(pos.shape)}")
    if not seed.device == pos.device == offsets.device:
        raise ValueError(
            f"seed, pos and offsets must be on one device, got {seed.device}, {pos.device}, {offsets.device}"
        )
    if not use_triton(impl, seed, pos, offsets):
        return uniform_grid_reference(seed, pos, offsets)
    B, N = seed.shape[0], offsets.shape[0]
    out = torch.empty(B, N, dtype=torch.float32, device=seed.device)
    if B * N == 0:
        return out
    block = min(UNIFORM_BLOCK, triton.next_power_of_2(N))
    grid = (B, triton.cdiv(N, block))
    _uniform_grid_kernel[grid](seed.contiguous(), pos.contiguous(), offsets.contiguous(), out, N, BLOCK=block)
    return out


def uniform_grid_reference(seed: torch.Tensor, pos: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`uniforms` over the (B, N) grid of counters pos[b] + offsets[j]."""
    return uniforms(seed[:, None], pos[:, None] + offsets[None, :])  # (B, 1) with (B, N): (B, N)


@triton.jit
def _uniform_grid_kernel(
    seed_ptr,  # (B,) int64
    pos_ptr,  # (B,) int64
    offsets_ptr,  # (N,) int64
    out_ptr,  # (B, N) float32, contiguous
    N,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    counter = tl.load(pos_ptr + row) + tl.load(offsets_ptr + j, mask=mask, other=0)
    tl.store(out_ptr + row * N + j, _uniform(tl.load(seed_ptr + row), counter), mask=mask)


# --- A round's tail in one launch: after the verify (and, in a sampled round, `accept_round`), each row's count and
# tokens into the round's output, its next input and position (and the draft's carried token) into the slot state.
# The torch chain it replaces is ~18 launches in a greedy round (mask, argmax, `accept_greedy`'s four, the new
# token's gather, the position's where, the carried token's cat and gather and index_put, `advance_slots`, the
# output's cat and copy) and ~10 in a sampled one.


def accept_greedy(drafts: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts (B, k), the target's argmax at the k + 1 positions (B, k + 1) -> (accepted (B,), tokens (B, k + 1)): the
    drafts stand while they equal the target's choice; the token after them is the target's."""
    k = drafts.shape[1]
    accepted = (drafts == target_ids[:, :k]).long().cumprod(dim=1).sum(dim=1)
    return accepted, target_ids


class FinishInputs(NamedTuple):
    """One `finish_round` call's tensors (see there), as its two implementations take them."""

    rows: torch.Tensor  # (B,) long: the rows' slots (padded rows: the scratch slot)
    x0: torch.Tensor  # (B,) long: the round's first input
    pos: torch.Tensor  # (B,) long: its position
    drafts: torch.Tensor  # (B, k) long
    accepted: torch.Tensor | None  # (B,) long (given mode)
    tokens: torch.Tensor | None  # (B, k + 1) long (given mode)
    logits: torch.Tensor | None  # (B, k + 1, V) float32 / bfloat16 / float16 (greedy mode)
    blocked: torch.Tensor | None  # (V,) bool (greedy mode)
    token_state: torch.Tensor  # (S,) long, written at rows
    pos_state: torch.Tensor  # (S,) long, written at rows
    prev_state: torch.Tensor | None  # (S,) long, written at rows
    out: torch.Tensor  # (B, k + 2) long, written


def finish_round(
    rows: torch.Tensor,
    x0: torch.Tensor,
    pos: torch.Tensor,
    drafts: torch.Tensor,
    *,
    accepted: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    blocked: torch.Tensor | None = None,
    scratch: int,
    token_state: torch.Tensor,
    pos_state: torch.Tensor,
    prev_state: torch.Tensor | None = None,
    out: torch.Tensor,
    impl: Impl = "auto",
) -> torch.Tensor:
    """A speculative round's tail (`inference_svc.speculative_resident`) over rows (B,) long of slots, each with its
    first input x0 (B,) long at position pos (B,) long and drafts (B, k) long. Greedy mode (logits (B, k + 1, V) in
    float32, bfloat16 or float16 and blocked (V,) bool): the target's ids are the argmax of the logits with blocked ids
    at -inf (torch.argmax: the first maximum, a row's first NaN), accepted the longest prefix of drafts equal to them,
    tokens the ids (`accept_greedy`); given mode: accepted (B,) and tokens (B, k + 1) long (`accept_round`'s). Then,
    at each row's slot: token_state = tokens[accepted], pos_state = pos + accepted + 1 (0 on `scratch`, the padded
    rows' slot, so it never runs past the cache), prev_state (if given) = x0 where nothing stood, else the last
    accepted draft; and out (B, k + 2) long = (accepted + 1, tokens). Returns out. impl: as `accept_round`'s (greedy
    mode needs V <= MAX_VOCAB for the kernel). One launch, no host sync, no allocation: capturable in a CUDA graph."""
    a = FinishInputs(rows, x0, pos, drafts, accepted, tokens, logits, blocked, token_state, pos_state, prev_state, out)
    _check_finish_args(a, scratch)
    supported = logits is None or logits.shape[-1] <= MAX_VOCAB
    given = [t for t in a if t is not None]
    if use_triton(impl, *given, supported=supported):
        return finish_round_triton(a, scratch)
    return finish_round_reference(a, scratch)


def _check_finish_args(a: FinishInputs, scratch: int) -> None:
    if not isinstance(a.drafts, torch.Tensor) or a.drafts.dim() != 2 or a.drafts.shape[1] < 1:
        got = f"{tuple(a.drafts.shape)} {a.drafts.dtype}" if isinstance(a.drafts, torch.Tensor) else repr(a.drafts)
        raise ValueError(f"drafts must be (B, k) int64 with k >= 1, got {got}")
    b, k = a.drafts.shape
    greedy = a.logits is not None
    if greedy == (a.accepted is not None or a.tokens is not None):
        raise ValueError("give either logits and blocked (greedy mode) or accepted and tokens (given mode), not both")
    if not isinstance(a.token_state, torch.Tensor) or a.token_state.dim() != 1:
        raise ValueError(f"token_state must be a 1-D int64 tensor (S,), got {a.token_state!r}")
    S = a.token_state.shape[0]
    long = (torch.long,)
    want = dict(rows=((b,), long), x0=((b,), long), pos=((b,), long), drafts=((b, k), long))
    if greedy:
        if not isinstance(a.logits, torch.Tensor) or a.logits.dim() != 3 or a.logits.shape[:2] != (b, k + 1):
            got = f"{tuple(a.logits.shape)}" if isinstance(a.logits, torch.Tensor) else repr(a.logits)
            raise ValueError(f"logits must be ({b}, {k + 1}, V) (B, k + 1 of the drafts, V >= 1), got {got}")
        V = a.logits.shape[2]
        want.update(logits=(((b, k + 1, V),), LOGIT_DTYPES), blocked=((V,), (torch.bool,)))
    else:
        want.update(accepted=((b,), long), tokens=((b, k + 1), long))
    want.update(token_state=((S,), long), pos_state=((S,), long), prev_state=((S,), long), out=((b, k + 2), long))
    _check_fields(a._asdict(), want, optional=("prev_state",))
    if greedy and a.logits.shape[2] < 1:
        raise ValueError("logits must have a vocabulary V >= 1, got 0")
    if isinstance(scratch, bool) or not isinstance(scratch, int) or not 0 <= scratch < S:
        raise ValueError(f"scratch must be a slot index in [0, {S}) (token_state's length), got {scratch!r}")


def finish_round_reference(a: FinishInputs, scratch: int) -> torch.Tensor:
    """The torch chain the round ran: (greedy) mask, argmax, `accept_greedy`; the new token's gather, the position's
    where, the carried token's cat and gather, the state's index_put (`advance_slots`' reference), the output's cat and
    copy."""
    if a.logits is not None:
        logits = a.logits.float().masked_fill(a.blocked, float("-inf"))  # (B, k + 1, V)
        accepted, tokens = accept_greedy(a.drafts, logits.argmax(dim=-1))
    else:
        accepted, tokens = a.accepted, a.tokens
    new = tokens.gather(1, accepted[:, None])[:, 0]
    after = torch.where(a.rows == scratch, 0, a.pos + accepted + 1)
    if a.prev_state is not None:  # x0 where nothing stood, else the last accepted draft
        a.prev_state[a.rows] = torch.cat([a.x0[:, None], a.drafts], dim=1).gather(1, accepted[:, None])[:, 0]
    a.token_state[a.rows] = new
    a.pos_state[a.rows] = after
    return a.out.copy_(torch.cat([(accepted + 1)[:, None], tokens], dim=1))


@triton.jit
def _finish_round_kernel(
    rows_ptr,  # (B,) int64
    x0_ptr,  # (B,) int64
    pos_ptr,  # (B,) int64
    drafts_ptr,  # (B, K) int64
    stride_d,
    logits_ptr,  # (B, K + 1, V) float32 / bfloat16 / float16, ids contiguous (GREEDY)
    stride_lb,
    stride_lj,
    blocked_ptr,  # (V,) uint8 (GREEDY)
    accepted_ptr,  # (B,) int64 (not GREEDY)
    tokens_ptr,  # (B, K + 1) int64 (not GREEDY)
    stride_t,
    token_state_ptr,  # (S,) int64 out
    stride_ts,
    pos_state_ptr,  # (S,) int64 out
    stride_ps,
    prev_state_ptr,  # (S,) int64 out (PREV)
    stride_pv,
    out_ptr,  # (B, K + 2) int64 out
    stride_o,
    scratch,
    K: tl.constexpr,
    KP: tl.constexpr,  # next_power_of_2(K + 1)
    V: tl.constexpr,
    VP: tl.constexpr,
    GREEDY: tl.constexpr,
    PREV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, KP)
    drafts = tl.load(drafts_ptr + row * stride_d + offs_k, mask=offs_k < K, other=-1)  # (KP,)
    if GREEDY:  # the target's argmax at each position; the drafts stand while they equal it
        offs = tl.arange(0, VP)
        in_v = offs < V
        blocked = tl.load(blocked_ptr + offs, mask=in_v, other=0) != 0
        tokens = tl.zeros((KP,), tl.int64)
        accepted = tl.zeros((), tl.int64)
        going = tl.full((), 1, tl.int64)
        for j in range(K + 1):
            logit = tl.load(logits_ptr + row * stride_lb + j * stride_lj + offs, mask=in_v, other=float("-inf"))
            logit = tl.where(blocked, float("-inf"), logit.to(tl.float32))
            target = _argmax(logit, offs, in_v, VP).to(tl.int64)
            tokens = tl.where(offs_k == j, target, tokens)
            draft = tl.sum(tl.where(offs_k == j, drafts, 0), axis=0)  # -1 at j = K: no draft there
            going = going * (draft == target).to(tl.int64)
            accepted += going
    else:
        accepted = tl.load(accepted_ptr + row)
        tokens = tl.load(tokens_ptr + row * stride_t + offs_k, mask=offs_k <= K, other=0)
    slot = tl.load(rows_ptr + row)
    new = tl.sum(tl.where(offs_k == accepted, tokens, 0), axis=0)
    after = tl.where(slot == scratch, 0, tl.load(pos_ptr + row) + accepted + 1)  # the scratch slot stays at 0
    tl.store(token_state_ptr + slot * stride_ts, new)
    tl.store(pos_state_ptr + slot * stride_ps, after)
    if PREV:  # x0 where nothing stood, else the last accepted draft
        last = tl.sum(tl.where(offs_k == accepted - 1, drafts, 0), axis=0)
        tl.store(prev_state_ptr + slot * stride_pv, tl.where(accepted == 0, tl.load(x0_ptr + row), last))
    tl.store(out_ptr + row * stride_o, accepted + 1)
    tl.store(out_ptr + row * stride_o + 1 + offs_k, tokens, mask=offs_k <= K)


def finish_round_triton(a: FinishInputs, scratch: int) -> torch.Tensor:
    """The kernel: one program per row, one launch, no host sync. Writes to a slot several rows share (the padded
    rows' scratch slot) land in any order: each writes position 0 there."""
    b, k = a.drafts.shape
    if b == 0:
        return a.out
    greedy, prev = a.logits is not None, a.prev_state is not None
    rows, x0, pos = (t.contiguous() for t in (a.rows, a.x0, a.pos))  # read at [row]
    drafts = a.drafts if a.drafts.stride(1) == 1 else a.drafts.contiguous()
    if greedy:
        logits = a.logits if a.logits.stride(2) == 1 else a.logits.contiguous()
        V, blocked = logits.shape[2], a.blocked.contiguous().view(torch.uint8)
        accepted, tokens, stride_t = pos, drafts, 0  # not read
    else:
        logits, V, blocked = drafts, 1, rows  # not read
        accepted = a.accepted.contiguous()
        tokens = a.tokens if a.tokens.stride(1) == 1 else a.tokens.contiguous()
        stride_t = tokens.stride(0)
    vp = triton.next_power_of_2(V)
    prev_state = a.prev_state if prev else a.pos_state  # not written without PREV
    out = a.out if a.out.stride(1) == 1 else None
    target = out if out is not None else torch.empty(b, k + 2, dtype=torch.long, device=a.out.device)
    _finish_round_kernel[(b,)](
        rows, x0, pos, drafts, drafts.stride(0),
        logits, logits.stride(0) if greedy else 0, logits.stride(1) if greedy else 0, blocked,
        accepted, tokens, stride_t,
        a.token_state, a.token_state.stride(0), a.pos_state, a.pos_state.stride(0),
        prev_state, prev_state.stride(0), target, target.stride(0), scratch,
        K=k, KP=triton.next_power_of_2(k + 1), V=V, VP=vp, GREEDY=greedy, PREV=prev,
        num_warps=num_warps(vp) if greedy else 1,
    )  # fmt: skip
    return a.out if out is not None else a.out.copy_(target)
