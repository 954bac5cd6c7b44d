"""Speculative decoding inside the engine on its logits path (`Engine(resident=False)`): a draft model proposes k
tokens per running sequence, the target checks them all in one batched step, and rejection sampling keeps the
target's distribution exactly (greedy output equals the target alone). The acceptance rule, the distributions and
the draw are those of the reference generator (`model.speculative`), so the engine and `speculative_generate` agree
on what a round does. The device-resident loop (the engine's default with torch runners) runs its rounds on the
device instead: `inference_svc.speculative_resident`, which shares `check_draft` and `SpeculativeStats`.

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
from model.field_checks import check_int
from model.speculative import MAX_DRAFT_TOKENS, draw_token, token_probabilities, verify_drafts

__all__ = ["SpeculativeDecoder", "SpeculativeStats", "check_draft"]


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens proposed so far
    accepted: int = 0  # of which the target kept


def check_draft(target: TorchRunner, draft: TorchRunner, k: int, max_slots: int) -> None:
    """Refuse a draft that cannot serve beside `target` (both engines' speculative paths), naming the reason."""
    if not (hasattr(target, "extend") and hasattr(draft, "extend")):
        raise ValueError("speculative decoding needs torch runners for the target and the draft (not ONNX Runtime)")
    check_int("speculative k", k, 1, MAX_DRAFT_TOKENS)
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft's vocab_size ({draft.vocab_size}) must equal the target's ({target.vocab_size}): "
            "the two models must share a tokenizer"
        )
    if draft.n_slots < max_slots:
        raise ValueError(f"the draft runner has {draft.n_slots} slots; the engine needs {max_slots}")
    if draft.device != target.device:
        raise ValueError(f"the draft runs on {draft.device}, the target on {target.device}: they must share a device")


class SpeculativeDecoder:
    """Draft-and-verify decode steps for the engine, over a target and a draft `TorchRunner` that share a
    tokenizer (same vocabulary) and slot numbering (the draft has at least the engine's slots)."""

    def __init__(self, target: TorchRunner, draft: TorchRunner, k: int, *, vocab_size: int, max_slots: int) -> None:
        check_draft(target, draft, k, max_slots)
        self.target, self.draft, self.k = target, draft, k
        self.vocab_size = vocab_size
        self.max_len = min(target.max_len, draft.max_len)
        self.stats = SpeculativeStats()

    def eligible(self, seq: Sequence) -> bool:
        """Whether a full round fits both contexts: the target writes positions up to length - 1 + k."""
        return seq.length + self.k < self.max_len

    def _probs(self, logits: torch.Tensor, row_seqs: list[Sequence], row_contexts: list[list[int]]) -> torch.Tensor:
        """The distributions each row's sampler draws from: logits (N, V), row i for row_seqs[i] after the tokens
        row_contexts[i] (read only for rows with a repetition penalty). Rows whose requests share temperature / top-k / top-p and have no repetition penalty go
        through one `token_probabilities` call; ids past the tokenizer's vocabulary (a padded embedding) get no
        mass, as in the plain sampler."""
        logits = logits[:, : self.vocab_size]
        probs = torch.empty_like(logits, dtype=torch.float32)
        groups: dict[tuple, list[int]] = {}
        for i, seq in enumerate(row_seqs):
            params = seq.request.params
            if params.repetition_penalty != 1.0:  # depends on the row's own context: alone
                probs[i] = token_probabilities(logits[i : i + 1], params, [row_contexts[i]])[0]
            else:
                groups.setdefault((params.temperature, params.top_k, params.top_p), []).append(i)
        for rows in groups.values():
            index = torch.tensor(rows, device=logits.device)
            probs[index] = token_probabilities(logits[index], row_seqs[rows[0]].request.params)
        return probs

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[list[int]]:
        """One round for every sequence (each `eligible`); returns the new tokens of each (1..k+1 of them)."""
        k = self.k
        slots = [seq.slot for seq in seqs]
        lengths = [seq.length for seq in seqs]
        # The whole context only where the repetition penalty reads it (copying it each step is O(length)).
        contexts = [seq.tokens_from(0) if seq.request.params.repetition_penalty != 1.0 else [] for seq in seqs]
        # Draft: catch each row's cache up with its context, then k - 1 one-token steps.
        logits = self.draft.extend(
            slots, [seq.tokens_from(seq.draft_cached) for seq in seqs], [seq.draft_cached for seq in seqs]
        )  # (B, V)
        drafts: list[list[int]] = [[] for _ in seqs]
        q_rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        for j in range(k):
            q = self._probs(logits, seqs, [c + d for c, d in zip(contexts, drafts)])
            for b, seq in enumerate(seqs):
                q_rows[b].append(q[b])
                drafts[b].append(draw_token(q[b], seq.generator))
            if j < k - 1:
                logits = self.draft.decode(slots, [d[-1] for d in drafts], [n + j for n in lengths])
        # Target: every row's last token and its k drafts in one step; distributions at all k + 1 positions.
        target_logits = self.target.extend(
            slots, [[seq.last_token, *d] for seq, d in zip(seqs, drafts)], [n - 1 for n in lengths], all_logits=True
        )  # (B, k + 1, V)
        p = self._probs(
            target_logits.flatten(0, 1),
            [seq for seq in seqs for _ in range(k + 1)],
            [c + d[:j] for c, d in zip(contexts, drafts) for j in range(k + 1)],
        ).view(len(seqs), k + 1, -1)
        new_tokens = []
        for b, seq in enumerate(seqs):
            n_ok, token = verify_drafts(drafts[b], q_rows[b], p[b], seq.generator)
            new_tokens.append(drafts[b][:n_ok] + [token])
            # the draft cache holds the context and drafts d1..d(k-1); what stands of them stays valid
            seq.draft_cached = lengths[b] + min(n_ok, k - 1)
            self.stats.proposed += k
            self.stats.accepted += n_ok
        return new_tokens
