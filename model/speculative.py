"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) in the reference generator.

A small draft model with the same tokenizer proposes k tokens one at a time; the target scores all of them in one
`forward_cached` call over k+1 positions. Draft token d_j, drawn from the draft's distribution q_j, is accepted with
probability min(1, p_j(d_j) / q_j(d_j)), p_j being the target's; at the first rejection a token is drawn from
norm(max(0, p_j - q_j)) instead and the round ends; when all k are accepted the target's next distribution gives
a bonus token. Every emitted token then has exactly the target's distribution, so the output is distributed as
`model.generate.generate_tokens(target, ...)` (and equals it token for token when greedy), at fewer target steps.

p and q are the distributions `model.sampling.sample` draws from (repetition penalty over the context so far,
temperature, top-k, top-p; greedy = one-hot on the argmax). Both KV caches are position-addressed: on rejection
a model's cache length simply rewinds, and the stale keys past it are overwritten by the next call.
Context windows follow `model.generate.stream_tokens` exactly (when predicting the next token would pass
block_size, re-prefill from the last block_size // 2 tokens), so greedy output matches it past block_size too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.field_checks import check_int
from model.kv_cache import KVCache
from model.sampling import SamplingParams, make_generator
from model.transformer import GPT

__all__ = ["MAX_DRAFT_TOKENS", "draw_token", "speculative_generate", "token_probabilities", "verify_drafts"]

MAX_DRAFT_TOKENS = 32


def _penalise(logits: torch.Tensor, penalty: float, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """CTRL repetition penalty of `model.sampling` on each row's seen tokens; logits (N, V) float32, in place."""
    for row, context in zip(logits, contexts):
        if context:
            seen = torch.as_tensor(sorted(set(context)), dtype=torch.long, device=logits.device)
            row[seen] = torch.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
    return logits


def token_probabilities(
    logits: torch.Tensor, params: SamplingParams, contexts: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """The distribution `model.sampling.sample` draws each row's token from: logits (N, V) -> probabilities (N, V)
    float32. `contexts` (one id list per row) feed the repetition penalty. Greedy (temperature 0) is one-hot."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and contexts is not None:
        logits = _penalise(logits, params.repetition_penalty, contexts)
    n, vocab = logits.shape
    if params.temperature == 0.0:
        return torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    # Same order of operations as `sample`: temperature, top-k over the stable descending sort, then top-p keeps the
    # smallest prefix of that order whose mass reaches top_p (the first token always stays).
    ranked, order = torch.sort(logits / params.temperature, dim=-1, descending=True, stable=True)  # (N, V)
    if params.top_k:
        ranked[:, params.top_k :] = float("-inf")
    probs = torch.softmax(ranked, dim=-1)
    if params.top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)  # back to vocabulary order


@dataclass
class _Window:
    """One model's slot-0 KV cache over a window of the context: it holds context[start : start + cached]."""

    model: GPT
    cache: KVCache
    start: int
    cached: int = 0
    forwards: int = 0

    def room(self, n: int) -> int:
        """Re-window if predicting token n would pass block_size (as stream_tokens does), then return how many
        tokens past n this window can still predict (it predicts token m while m - start <= block_size)."""
        block = self.model.config.block_size
        if n - self.start > block:
            self.start, self.cached = n - max(block // 2, 1), 0
        return self.start + block - n

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Write `tokens` after the cached ones; return their logits (len(tokens), V)."""
        device = self.cache.k.device
        idx = torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)
        pos = torch.tensor([self.cached], dtype=torch.long, device=device)
        logits = self.model.forward_cached(idx, self.cache, torch.zeros_like(pos), pos)  # (1, T, V)
        self.cached += len(tokens)
        self.forwards += 1
        return logits[0]

    def pending(self, context: Sequence[int]) -> list[int]:
        """The context tokens this window has not cached yet (the newest ones)."""
        return list(context[self.start + self.cached :])


def _window(model: GPT, context_len: int) -> _Window:
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    cache = KVCache(1, model.config, dtype=dtype, device=param.device)
    return _Window(model, cache, start=max(0, context_len - model.config.block_size))


def draw_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from probs (V,), with `generator` (None: the global RNG)."""
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    gen_device = generator.device if generator is not None else device
    return float(torch.rand((), generator=generator, device=gen_device))


def verify_drafts(
    drafts: Sequence[int], q_rows: Sequence[torch.Tensor], p_rows: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """The rejection-sampling step of one round: draft token drafts[j] was drawn from q_rows[j] (V,); p_rows
    (len(drafts) + 1, V) are the target's distributions at the same positions and one past them. Returns
    (n_accepted, token): the first n_accepted drafts stand, then `token` (a resample from norm(max(0, p - q)) at
    the first rejection, or the bonus token from the last row when all were accepted)."""
    for j, (d, q) in enumerate(zip(drafts, q_rows)):
        if _uniform(generator, p_rows.device) * float(q[d]) < float(p_rows[j, d]):  # u < p/q: accept
            continue
        residual = (p_rows[j] - q).clamp(min=0.0)
        return j, draw_token(residual if float(residual.sum()) > 0 else p_rows[j], generator)
    return len(drafts), draw_token(p_rows[len(drafts)], generator)  # all accepted: the bonus token


def _check_args(target: GPT, draft: GPT, prompt_ids: Sequence[int], k: int) -> None:
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab:
        raise ValueError(
            f"draft vocab_size must equal the target's ({vocab}): the two models must share a tokenizer, "
            f"got {draft.config.vocab_size}"
        )
    check_int("k", k, 1, MAX_DRAFT_TOKENS)
    if len(prompt_ids) == 0:
        raise ValueError("prompt must hold at least 1 token")
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
    if next(target.parameters()).device != next(draft.parameters()).device:
        raise ValueError("target and draft must be on the same device")


@torch.inference_mode()
def speculative_generate(
    target: GPT, draft: GPT, prompt_ids: Sequence[int], params: SamplingParams, k: int = 4
) -> tuple[list[int], dict[str, float]]:
    """`params.max_new_tokens` new ids after `prompt_ids`, distributed as the target alone would sample them
    (stop strings not applied, as `generate_tokens`). Puts both models in eval mode.

    stats: proposed / accepted draft tokens, acceptance_rate = accepted / proposed, target_forwards and
    draft_forwards (forward_cached calls; one target call per round, the prefill included)."""
    _check_args(target, draft, prompt_ids, k)
    target.eval()
    draft.eval()
    device = next(target.parameters()).device
    generator = make_generator(params.seed, device)
    penalise = params.repetition_penalty != 1.0
    context = list(prompt_ids)
    tgt, dft = _window(target, len(context)), _window(draft, len(context))
    out: list[int] = []
    proposed = accepted = 0
    while len(out) < params.max_new_tokens:
        n = len(context)  # predicting token n onwards; token n-1 is not in either cache yet
        k_round = min(k, params.max_new_tokens - len(out) - 1, tgt.room(n))
        if k_round > 0:
            k_round = min(k_round, dft.room(n) + 1)  # the draft predicts tokens n .. n + k_round - 1
        # Draft: propose k_round tokens, one step each, keeping the distribution each was drawn from.
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        for j in range(k_round):
            logits = dft.feed(dft.pending(context) if j == 0 else drafts[-1:])[-1:]  # (1, V)
            q = token_probabilities(logits, params, [context + drafts] if penalise else None)[0]
            q_rows.append(q)
            drafts.append(draw_token(q, generator))
        # Target: one step over the pending context tokens and the drafts: distributions of tokens n .. n + k_round.
        logits = tgt.feed(tgt.pending(context) + drafts)[-(k_round + 1) :]  # (k_round + 1, V)
        contexts = [context + drafts[:j] for j in range(k_round + 1)] if penalise else None
        p_rows = token_probabilities(logits, params, contexts)
        n_ok, token = verify_drafts(drafts, q_rows, p_rows, generator)
        proposed += k_round
        accepted += n_ok
        new = drafts[:n_ok] + [token]
        context += new
        out += new
        # Rewind: both caches keep context up to token n-1 plus the accepted drafts they hold (position-addressed,
        # so the rejected tail is simply overwritten later).
        tgt.cached = n - tgt.start + n_ok
        if k_round > 0:
            dft.cached = n - dft.start + min(n_ok, k_round - 1)
    stats = {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "target_forwards": tgt.forwards,
        "draft_forwards": dft.forwards,
    }
    return out, stats
