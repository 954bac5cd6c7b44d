"""Speculative decoding inside the engine: a draft model proposes k tokens per running sequence, the target checks
them all in one batched step, and rejection sampling keeps the target's distribution exactly (greedy output equals
the target alone). The acceptance rule, the distributions and the draw are those of the reference generator
(`model.speculative`), so the engine and `speculative_generate` agree on what a round does.

One engine decode step over B sequences becomes:
1. draft: one `extend` that brings each row's draft cache up to date (the tokens it has not seen: usually the
   last one, two after a round whose drafts were all accepted, the whole prompt on a sequence's first round),
   then k - 1 batched one-token draft steps (CUDA graphs on the GPU); each row draws its drafts from its own
   sampling distribution q with its own generator;
2. target: one `extend` over [last token, d1..dk] per row, logits at all k + 1 positions;
3. per row, `model.speculative.verify_drafts` accepts a prefix of the drafts and adds one token, so each
   sequence gains 1..k+1 tokens for one target step.
Both caches are position-addressed: rejected drafts' keys and values are simply overwritten later. A sequence
whose next round would pass either model's context runs plain decode steps instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_svc.runner import TorchRunner
from inference_svc.sequence import Sequence
from model.speculative import MAX_DRAFT_TOKENS, draw_token, token_probabilities, verify_drafts

__all__ = ["SpeculativeDecoder", "SpeculativeStats"]


@dataclass
class SpeculativeStats:
    rounds: int = 0  # sequence-rounds (one per sequence per speculative step)
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class SpeculativeDecoder:
    """Draft-and-verify decode steps for the engine, over a target and a draft `TorchRunner` that share a
    tokenizer (same vocabulary) and slot numbering (the draft has at least the engine's slots)."""

    def __init__(self, target: TorchRunner, draft: TorchRunner, k: int, *, vocab_size: int, max_slots: int) -> None:
        if not (hasattr(target, "extend") and hasattr(draft, "extend")):
            raise ValueError("speculative decoding needs torch runners for the target and the draft (not ONNX Runtime)")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"speculative k must be an integer in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
        if draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft's vocab_size ({draft.vocab_size}) must equal the target's ({target.vocab_size}): "
                "the two models must share a tokenizer"
            )
        if draft.n_slots < max_slots:
            raise ValueError(f"the draft runner has {draft.n_slots} slots; the engine needs {max_slots}")
        if draft.device != target.device:
            raise ValueError(f"the draft runs on {draft.device}, the target on {target.device}: they must share a device")
        self.target, self.draft, self.k = target, draft, k
        self.vocab_size = vocab_size
        self.max_len = min(target.max_len, draft.max_len)
        self.stats = SpeculativeStats()

    def eligible(self, seq: Sequence) -> bool:
        """Whether a full round fits both contexts: the target writes positions up to length - 1 + k."""
        return seq.length + self.k < self.max_len

    def _probs(self, logits: torch.Tensor, seq: Sequence, contexts: list[list[int]]) -> torch.Tensor:
        """The distributions seq's sampler draws from, one per row of logits (N, V): ids past the tokenizer's
        vocabulary (a padded embedding) get no mass, as in the plain sampler."""
        logits = logits[:, : self.vocab_size]
        params = seq.request.params
        probs = token_probabilities(logits, params, contexts if params.repetition_penalty != 1.0 else None)
        return probs

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[list[int]]:
        """One round for every sequence (each `eligible`); returns the new tokens of each (1..k+1 of them)."""
        k = self.k
        slots = [seq.slot for seq in seqs]
        contexts = [[*seq.request.prompt_ids, *seq.output_ids] for seq in seqs]
        # Draft: catch each row's cache up with its context, then k - 1 one-token steps.
        logits = self.draft.extend(slots, [c[seq.draft_cached :] for c, seq in zip(contexts, seqs)],
                                   [seq.draft_cached for seq in seqs])  # (B, V)
        drafts: list[list[int]] = [[] for _ in seqs]
        q_rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        for j in range(k):
            for b, seq in enumerate(seqs):
                q = self._probs(logits[b : b + 1], seq, [contexts[b] + drafts[b]])[0]
                q_rows[b].append(q)
                drafts[b].append(draw_token(q, seq.generator))
            if j < k - 1:
                logits = self.draft.decode(slots, [d[-1] for d in drafts], [len(c) + j for c in contexts])
        # Target: every row's last token and its k drafts in one step; distributions at all k + 1 positions.
        target_logits = self.target.extend(slots, [[c[-1], *d] for c, d in zip(contexts, drafts)],
                                           [len(c) - 1 for c in contexts], all_logits=True)  # (B, k + 1, V)
        new_tokens = []
        for b, seq in enumerate(seqs):
            p_rows = self._probs(target_logits[b], seq, [contexts[b] + drafts[b][:j] for j in range(k + 1)])
            n_ok, token = verify_drafts(drafts[b], q_rows[b], p_rows, seq.generator)
            new_tokens.append(drafts[b][:n_ok] + [token])
            # the draft cache holds the context and drafts d1..d(k-1); what stands of them stays valid
            seq.draft_cached = len(contexts[b]) + min(n_ok, k - 1)
            self.stats.rounds += 1
            self.stats.proposed += k
            self.stats.accepted += n_ok
        return new_tokens
