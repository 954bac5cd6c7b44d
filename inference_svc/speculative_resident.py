"""Speculative decoding on the device-resident loop: a draft proposes k tokens per row, the target verifies them in
one step, and the acceptance runs vectorised over the batch, all inside one CUDA graph per (batch bucket, attention
span, greedy-only / full), with no host sync (eager on CPU: the same code).

One round over rows whose next input x_n sits at position n (both on the device: `SlotState.token` / `pos`):
1. draft: k one-token steps feeding x_n, d_1 .. d_(k-1) at n .. n+k-1, each drawing d_(j+1) from its distribution q
   (greedy: the argmax). d_k's keys and values are left to the next round, whose first step also feeds the token
   before its input (at n' - 1: d_k where all k stood, else a token already there, rewritten), so the draft's cache
   holds every token a round can accept with k forwards a round and no catch-up of variable length (with the
   one-launch draft, `draft_kernel`: k + 1 steps, the last for d_k's keys and values only);
2. target: one step over [x_n, d_1 .. d_k] at n .. n+k: distributions p at n+1 .. n+k+1;
3. acceptance (Leviathan et al. 2023): d_j stands while u_j * q_j(d_j) < p_j(d_j); at the first rejection a token is
   drawn from norm(max(0, p_j - q_j)), after k acceptances from p_(k+1). Greedy rows: the longest prefix where the
   draft equals the target's argmax, then the target's argmax (one-hot p and q give the same in the full graph).
   Full rounds: `kernels.accept_round` (its reference, or with `accept_kernel` one launch for the whole step);
4. each row's tokens and count go to one output buffer (count, t_1 .. t_(k+1)); the last token and its position
   become the slot's next input (its repetition-penalty mask takes the new tokens). With `finish_kernel`, this step
   (and a greedy round's acceptance) is one launch, `kernels.accept_round.finish_round`, instead of ~18 / ~10 ops.
Every emitted token thus has the target's distribution (`probabilities` is the plain sampler's: penalty, temperature,
top-k, top-p), and greedy output equals the target alone. Draws are `model.sampling.uniforms(seed, position + tag)`,
one tag per use (draft, accept, resample), so a seed gives the same tokens whatever else is in the batch.

`SpeculativeRunner` is what the engine drives when it has a draft: the target `TorchRunner`'s resident calls
(prefills and chunks go to both models; a plain step takes the row off the draft for good) plus `round`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from kernels.accept_round import (
    accept_greedy,
    accept_round,
    accept_sampled,
    draft_sample,
    finish_round,
    probabilities,
    uniform_grid,
    uniform_grid_reference,
)
from kernels.decode_gemv import MAX_ROWS
from kernels.dispatch import option_impl, repeat_rows
from kernels.draft_steps import DraftModel, draft_steps
from kernels.draft_steps import inverse_cdf as draw  # one id per row by inverse CDF (the kernel's rule too)
from inference_svc.runner import _PREFILL_BUCKETS, SlotState, TorchRunner, batch_buckets
from inference_svc.sequence import Sequence as Seq
from inference_svc.speculative import SpeculativeStats, check_draft
from model.sampling import SamplingParams

__all__ = ["SpeculativeRunner", "accept_greedy", "accept_sampled", "draw", "probabilities", "round_uniforms"]

# Counter tags of the round's draws: uniforms(seed, position + tag). The plain sampler draws at tag 0; positions stay
# far below 2**29, and uniforms reads the counter's low 32 bits.
_DRAFT, _ACCEPT, _RESAMPLE = 1 << 29, 2 << 29, 3 << 29
_SETTINGS = ("greedy", "temperature", "top_k", "top_p")  # a full round's per-row settings, in `settings`' order
_GREEDY = SamplingParams(max_new_tokens=1, temperature=0.0)  # the draft's prefill: its sampled token is not used


def round_offsets(k: int, device: torch.device) -> torch.Tensor:
    """The counters of a round's draws past each row's position (3k + 1,) long: the drafts' at pos + 1 .. pos + k, the
    accept tests' there, then the new token's at each place it can land, pos + 1 .. pos + k + 1 (each use its own
    tag: independent draws). Aranges, not torch.tensor(list): a copy from host memory is refused in a capture."""
    tags = ((_DRAFT, k), (_ACCEPT, k), (_RESAMPLE, k + 1))
    return torch.cat([torch.arange(1 + tag, n + 1 + tag, device=device) for tag, n in tags])


def round_uniforms(seed: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Every draw a sampled round may make, in one `uniforms` call (~40 elementwise launches; the runner's
    `uniform_grid` takes one with `sample_kernels`): seed, pos (B,) long -> (B, 3k + 1) float32 at `round_offsets`."""
    return uniform_grid_reference(seed, pos, round_offsets(k, seed.device))


class SpeculativeRunner:
    """The engine's runner with a draft on the resident loop: `target`'s prefill / chunk / plain-step calls, the draft
    kept in step with every prompt, and `round`. Both share the engine's slot numbers and the target's `SlotState`
    (the rows' next input, position and sampling settings). A row is on the draft from its prefill until a plain
    step (near the end of the draft's context) takes it off."""

    def __init__(
        self,
        target: TorchRunner,
        draft: TorchRunner,
        k: int,
        max_slots: int,
        *,
        draft_kernel: bool | str = False,
        accept_kernel: bool | str = True,
        verify_kernels: bool = True,
        carry_draft: bool = True,
        sample_kernels: bool | str = True,
        finish_kernel: bool | str = True,
    ) -> None:
        check_draft(target, draft, k, max_slots)
        for name, value in (("verify_kernels", verify_kernels), ("carry_draft", carry_draft)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        # The verify on the target's small-batch decode kernels (rows of one slot: every row's K/V written first)
        # where its rows fit them (b (k + 1) <= 16 rows); else, and off, the usual step over the cache in place.
        self._verify_kernels = verify_kernels
        self.target, self.draft, self.k = target, draft, k
        # The draft's k + 1 steps of a round in one launch (kernels.draft_steps): True (or "auto") the kernel on CUDA,
        # its reference (the same steps through forward_cached) elsewhere; "triton" forces the kernel (the interpreter
        # on CPU), "reference" the reference. Its packed weights are made once, here.
        self._draft_impl = option_impl("draft_kernel", draft_kernel)
        self._draft_model = DraftModel(draft.model) if self._draft_impl is not None else None
        # A sampled round's acceptance (the target's distributions, the rejection tests, the new token's draw, the
        # context mask) in one launch (kernels.accept_round): the same choices as above; off: its reference.
        self._accept_impl = option_impl("accept_kernel", accept_kernel) or "reference"
        # A sampled round's uniforms (`kernels.accept_round.uniform_grid`) and each of the draft loop's draws
        # (`draft_sample`: mask, distribution, draw, context) in one launch each: the same values as off (their
        # references, ~40 and ~30 launches); True (or "auto") the kernels on CUDA, as for accept_kernel.
        self._sample_impl = option_impl("sample_kernels", sample_kernels) or "reference"
        # The round's tail in one launch (`kernels.accept_round.finish_round`): a greedy round's argmax and acceptance,
        # then every round's slot state (next input, position, the draft's carried token) and output; the same
        # choices as above; off: its reference, the torch ops (~18 launches a greedy round, ~10 a sampled one).
        self._finish_impl = option_impl("finish_kernel", finish_kernel) or "reference"
        self._offsets = round_offsets(k, target.device)
        # (k + 2, 1): a round's position offsets, -1 (the carried token) .. k, added to its rows' n in one launch
        self._steps = torch.arange(-1, k + 1, device=target.device)[:, None]
        # A greedy draft step's settings for `draft_sample` (sample_kernels on): its argmax in one launch, not three
        n = target.n_slots
        self._argmax_settings = dict(
            greedy=torch.ones(n, dtype=torch.bool, device=target.device),
            temperature=torch.ones(n, 1, device=target.device),
            top_k=torch.zeros(n, 1, dtype=torch.long, device=target.device),
            top_p=torch.ones(n, 1, device=target.device),
        )
        self._zeros = torch.zeros(n, device=target.device)  # a one-hot's draw at any u in [0, 1): its id
        self.n_slots, self.max_len, self.vocab_size = target.n_slots, target.max_len, target.vocab_size
        self.device, self.staging = target.device, target.staging
        self.state: SlotState = target.state
        self.stats = SpeculativeStats()
        # `carry_draft` (the draft loop; not with the kernel): d_k's keys and values carried to the next round, whose
        # first step feeds the token at each row's pos - 1 too (the module's step 1), k forwards a round instead of
        # k + 1; set from the prompt's last token at a prefill, then from each round's accepted tokens.
        # Only while the first step's 2b rows fit the small-batch decode kernels (MAX_ROWS): past that it would leave
        # them, costing more than the forward it saves (H200, twelfth session: the B16 round 0.719 -> 0.792 ms).
        self._lagged = carry_draft and self._draft_impl is None
        self._prev = torch.zeros_like(self.state.token)
        # A round at position n writes n .. n+k into both caches.
        self._round_end = min(target.max_len, draft.max_len) - k  # rounds run while n < this
        self._on_draft = [False] * target.n_slots  # host: the slot's draft cache follows its context
        self._penalised = [False] * target.n_slots  # host: the slot's request has a repetition penalty
        if target.cuda_graphs:
            self._rows = torch.full((target.n_slots,), target._scratch, dtype=torch.long, device=self.device)
            self._draft_rows = torch.full((target.n_slots,), draft._scratch, dtype=torch.long, device=self.device)
            self._rows_now: list[int] = []
            self._out = torch.zeros(target.n_slots, k + 2, dtype=torch.long, device=self.device)

    def eligible(self, seq: Seq) -> bool:
        """Whether `seq` can take a round: on the draft, and its next round fits both contexts. `launched` counts an
        in-flight round at k + 1 tokens (an upper bound until its count is streamed)."""
        return self._on_draft[seq.slot] and seq.prompt_len + seq.launched - 1 < self._round_end

    # The target's resident calls, with the draft kept in step ---------------------------------------

    def extend(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """A chunk of each long prompt into both caches (the draft only where the prompt can still take rounds)."""
        rows = self._draft_rows_for(slots, [s + len(c) for s, c in zip(starts, chunks)], starts)
        if rows:
            self.draft.extend([slots[b] for b in rows], [chunks[b] for b in rows], [starts[b] for b in rows])
        return self.target.extend(slots, chunks, starts)

    def prefill_sample(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        starts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """`TorchRunner.prefill_sample` on the target, the prompts (their rest, after chunks) into the draft too."""
        starts = [0] * len(slots) if starts is None else list(starts)
        for slot, p in zip(slots, params):
            self._penalised[slot] = p.repetition_penalty != 1.0
        rows = self._draft_rows_for(slots, [len(p) for p in prompts], starts)
        if rows and self._lagged:  # the token before the first round's input: the prompt's last
            host = torch.tensor([[slots[b] for b in rows], [prompts[b][-1] for b in rows]])
            where, last = self.staging.to_device(host)
            self._prev[where] = last
        if rows:
            self.draft.prefill_sample(
                [slots[b] for b in rows],
                [prompts[b] for b in rows],
                [_GREEDY] * len(rows),
                [0] * len(rows),
                [starts[b] for b in rows],
            )
        return self.target.prefill_sample(slots, prompts, params, seeds, starts)

    def _draft_rows_for(self, slots: Sequence[int], ends: Sequence[int], starts: Sequence[int]) -> list[int]:
        """The rows whose prompt goes into the draft (a new prompt starts on it; one that would end past where
        rounds can run leaves it); updates which slots are on the draft."""
        rows = []
        for b, (slot, start, end) in enumerate(zip(slots, starts, ends)):
            on = (start == 0 or self._on_draft[slot]) and end < self._round_end
            self._on_draft[slot] = on
            if on:
                rows.append(b)
        return rows

    def decode_sample(self, slots: Sequence[int], kv_len: int, full: bool, steps: int = 1) -> torch.Tensor:
        """Plain resident steps on the target (`TorchRunner.decode_sample`); their rows leave the draft for good."""
        for slot in slots:
            self._on_draft[slot] = False
        return self.target.decode_sample(slots, kv_len, full, steps)

    def release(self, slot: int) -> None:
        self.target.release(slot)
        self.draft.release(slot)

    def capture_graphs(self, steps: int | Callable[[int], int] = 1) -> None:
        """The target's graphs (`steps`: its multi-step decode), the draft's short prefills, and a round per (batch
        bucket, span, greedy-only / sampled / sampled with a penalty)."""
        self.target.capture_graphs(steps)
        if not self.target.cuda_graphs:
            return
        draft = self.draft
        if draft.cuda_graphs:
            for b in (x for x in batch_buckets(draft.n_slots) if x <= 8):
                for T in (t for t in _PREFILL_BUCKETS[:3] if t <= draft.max_len):
                    if draft._prefill_graphs:
                        with contextlib.suppress(RuntimeError):  # logged; the draft's prefill stays eager
                            draft._prefill_graph(b, T, False)
        for b in reversed(batch_buckets(self.n_slots)):
            for span in reversed(self.target._kv_buckets()):
                for full, penalty in ((True, True), (True, False), (False, False)):
                    self._round_graph(b, span, full, penalty)
        torch.cuda.synchronize(self.device)

    # The round ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def round(self, slots: Sequence[int], kv_len: int, full: bool) -> torch.Tensor:
        """One speculative round for the rows in `slots` (each `eligible`; every target position a round writes
        < kv_len); `full` when some row samples or penalises. Returns (B, k + 2) long on the device: each row's
        token count (1 .. k+1), then its tokens (those past the count are meaningless). A view of a buffer that the
        next round rewrites: copy it before then (a copy enqueued now is safe)."""
        B = len(slots)
        penalty = full and any(self._penalised[s] for s in slots)  # else the graph without the penalty's ops
        if not self.target.cuda_graphs:
            rows = self.staging.to_device(torch.tensor(list(slots), dtype=torch.long))
            return self._round_step(rows, rows, kv_len, full, penalty)
        b = next(x for x in batch_buckets(self.n_slots) if x >= B)
        span = self.target._span(kv_len)
        slots = list(slots)
        if slots != self._rows_now:  # a new row -> slot map (rows past B: each model's scratch slot)
            pad = max(0, len(self._rows_now) - B)
            host = torch.tensor([slots + [self.target._scratch] * pad, slots + [self.draft._scratch] * pad])
            both = self.staging.to_device(host)
            self._rows[: B + pad].copy_(both[0])
            self._draft_rows[: B + pad].copy_(both[1])
            self._rows_now = slots
        self._round_graph(b, span, full, penalty).graph.replay()
        return self._out[:B]

    def _round_graph(self, b: int, span: int, full: bool, penalty: bool):
        key = ("speculative", self.k, b, span, full, penalty)
        graph = self.target._graphs.get(key)
        if graph is not None:
            return graph
        # The capture's warm-up runs for real: every row on its scratch slot meanwhile.
        saved = self._rows.clone(), self._draft_rows.clone()
        self._rows.fill_(self.target._scratch)
        self._draft_rows.fill_(self.draft._scratch)
        try:
            return self.target._graph(
                key, lambda: self._round_step(self._rows[:b], self._draft_rows[:b], span, full, penalty, self._out[:b])
            )
        finally:
            self._rows.copy_(saved[0])
            self._draft_rows.copy_(saved[1])

    def _verify(
        self, ids: torch.Tensor, rows: torch.Tensor, at: torch.Tensor, kv_len: int, float32: bool = True
    ) -> torch.Tensor:
        """The target over ids (b, k + 1) at positions at (b * (k + 1),) (row by row: pos .. pos + k) of each row's
        slot: logits (b, k + 1, V), float32 (else in the model's dtype: `finish_round` reads those).
        Run as b * (k + 1) one-token rows (row j of a slot at pos + j, attending to its slot up to there): every
        row's keys and values are written before any row attends, so the rows of one slot see each other, and
        attention can read the cache in place (`kernels.decode_attention`) instead of gathering it for SDPA. With
        `verify_kernels`, on the target's small-batch decode kernels where the rows fit them (~6 launches a layer
        instead of ~12), their attention step told that rows share slots (all K/V stored, then attention)."""
        b, n = ids.shape
        logits = self.target.model.forward_cached(
            ids.view(-1, 1),
            self.target.cache,
            repeat_rows(rows, n),
            at,
            kv_len=kv_len,
            attention_in_place=self.target.attention_in_place,
            small_batch_kernels=self.target.small_batch_kernels if self._verify_kernels else False,
            rows_share_slots=True,
        )  # (b * n, 1, V)
        logits = logits.view(b, n, -1)
        return logits.float() if float32 else logits

    def _draft_loop(
        self,
        x0: torch.Tensor,
        prev: torch.Tensor | None,
        draft_rows: torch.Tensor,
        at: torch.Tensor,
        draft_span: int,
        sampling: tuple | None,
        u: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The draft's steps one forward at a time (`draft_kernel` off), at (k + 2, b) the round's positions (row j + 1
        step j's, n + j; row 0 n - 1, clamped). With prev (b,), the token at n - 1 (carrying: its keys and values are
        d_k's of the last round, or a rewrite), k steps, the first over two rows a slot (prev, x0); without (None),
        k + 1, the last for d_k's keys and values only. A greedy step's draw: `draft_sample` with greedy settings (one
        launch) with sample_kernels, else the masked argmax's torch chain (the same ids). `sampling` (full rounds):
        (seen, rate, settings) as `_round_step` reads them, u the round's uniforms. Returns drafts (b, k), q (b, k, V) (full
        rounds: the sampler's distributions, penalty, top-k and top-p included; else None) and the contexts before
        each draft and after the last (b, k + 1, V) (the penalty's masks, which the acceptance need not rebuild;
        None without one)."""
        state, k, draft = self.state, self.k, self.draft
        b = x0.shape[0]
        if sampling is not None:
            seen, rate, settings = sampling
        x, drafts, q, contexts = x0, [], [], []
        carry = prev is not None
        for j in range(k if carry else k + 1):
            ids, where, on = x, at[j + 1], draft_rows
            if j == 0 and carry:  # the row's n - 1 too, written first (at[:2]: n - 1 then n, contiguous)
                ids, where, on = torch.cat([prev, x0]), at[:2].reshape(-1), draft_rows.repeat(2)
            logits = draft.model.forward_cached(
                ids.view(-1, 1),
                draft.cache,
                on,
                where,
                kv_len=draft_span,
                attention_in_place=draft.attention_in_place,
                small_batch_kernels=draft.small_batch_kernels,
                rows_share_slots=j == 0 and carry,
            )[-b:]  # (b, 1, V): x's rows
            if j == k:  # not carrying: d_k's keys and values only
                break
            if sampling is not None:  # mask, q, draw, context: one launch with sample_kernels, else their torch chain
                contexts.append(seen)
                q_j, x, seen = draft_sample(
                    logits[:, 0], state.blocked, u[:, j], **dict(zip(_SETTINGS, settings)), seen=seen,
                    penalty=rate, impl=self._sample_impl,
                )  # fmt: skip
                q.append(q_j)
            elif self._sample_impl != "reference":
                x = draft_sample(
                    logits[:, 0], state.blocked, self._zeros[:b], **{n: t[:b] for n, t in self._argmax_settings.items()},
                    impl=self._sample_impl,
                )[1]  # fmt: skip
            else:
                x = logits[:, 0].float().masked_fill(state.blocked, float("-inf")).argmax(dim=-1)
            drafts.append(x)
        contexts.append(seen if sampling is not None else None)
        seen_all = torch.stack(contexts, dim=1) if contexts[-1] is not None else None
        return torch.stack(drafts, dim=1), (torch.stack(q, dim=1) if q else None), seen_all

    def _round_step(
        self,
        rows: torch.Tensor,
        draft_rows: torch.Tensor,
        kv_len: int,
        full: bool,
        penalty: bool,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What a round graph records, over rows (b,) of target slots and the same rows' draft slots (padded rows:
        each model's scratch slot); `penalty` (with `full`): some row has a repetition penalty, so the rows' context
        masks are read and kept (else they are left alone: only a penalty reads them). Returns (b, k + 2): count,
        then tokens; written into `out` (b, k + 2) long when given (the graph's output buffer), which it returns."""
        state, k, draft = self.state, self.k, self.draft
        x0, pos = state.token[rows], state.pos[rows]  # (b,): the rows' next input and its position n
        # (k + 2, b) every position the round feeds, in two launches: row j + 1 draft step j's and verify row j's
        # (n + j), row 0 the carried token's (n - 1, clamped: a padded row sits at 0)
        at = (pos + self._steps).clamp_(min=0)
        if full:
            seed = state.seed[rows]
            settings = (state.greedy[rows], state.temperature[rows], state.top_k[rows], state.top_p[rows])
            rate = state.penalty[rows] if penalty else None
            seen = state.seen[rows] if penalty else None  # (b, V): the context through x_n
        draft_span = min(kv_len, draft.max_len)
        # (b, 3k + 1): drafts', accept tests', the new token's
        u = uniform_grid(seed, pos, self._offsets, impl=self._sample_impl) if full else None
        if self._draft_impl is not None:  # the k + 1 steps in one launch; q: temperature only (any q stays exact)
            greedy, temperature = (settings[0], settings[1]) if full else (True, None)
            drafts_t, q_t = draft_steps(
                self._draft_model,
                draft.cache,
                draft_rows,
                pos,
                x0,
                k,
                span=draft_span,
                greedy=greedy,
                temperature=temperature,
                uniforms=u[:, :k] if full else None,
                blocked=state.blocked,
                impl=self._draft_impl,
            )  # (b, k), (b, k, V) or None
        else:
            sampling = (seen, rate, settings) if full else None
            # carrying d_k's keys while the first step's 2b rows fit the small-batch kernels (see __init__)
            prev = self._prev[rows] if self._lagged and 2 * rows.shape[0] <= MAX_ROWS else None
            drafts_t, q_t, contexts = self._draft_loop(x0, prev, draft_rows, at, draft_span, sampling, u)
            if contexts is not None:  # (b, k + 1, V): the contexts the loop built, which the acceptance reuses
                seen = contexts
        ids = torch.cat([x0[:, None], drafts_t], dim=1)  # (b, k + 1)
        verify_at = at[1:].t().reshape(-1)  # (b * (k + 1),) the verify's positions, row by row
        if not full:  # `finish_round` masks and takes the argmax itself, in the logits' dtype
            logits = self._verify(ids, rows, verify_at, kv_len, float32=False)  # (b, k + 1, V)
            return self._finish(rows, x0, pos, drafts_t, dict(logits=logits, blocked=state.blocked), out)
        # the target's distributions (penalty over each position's context), rejection, the new token
        logits = self._verify(ids, rows, verify_at, kv_len)  # (b, k + 1, V) float32
        logits = logits.masked_fill(state.blocked, float("-inf"))
        greedy, temperature, top_k, top_p = settings
        acceptance = accept_round(
            logits,
            drafts_t,
            q_t,
            u[:, k : 2 * k],
            u[:, 2 * k :],
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seen=seen,
            penalty=rate,
            impl=self._accept_impl,
        )
        if penalty:  # the context gained the accepted drafts and the new token (the repetition penalty's mask)
            state.seen[rows] = acceptance[2]
        return self._finish(rows, x0, pos, drafts_t, dict(accepted=acceptance[0], tokens=acceptance[1]), out)

    def _finish(
        self,
        rows: torch.Tensor,
        x0: torch.Tensor,
        pos: torch.Tensor,
        drafts: torch.Tensor,
        mode: dict[str, torch.Tensor],
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """The round's tail (`finish_round`: one launch with `finish_kernel`, else its torch reference): `mode` the
        verify's logits and the blocked ids (greedy rounds) or the acceptance's accepted and tokens; the slot state and
        `out` (b, k + 2) (made here if None)."""
        if out is None:
            out = torch.empty(rows.shape[0], self.k + 2, dtype=torch.long, device=rows.device)
        state = self.state
        return finish_round(
            rows, x0, pos, drafts, **mode, scratch=self.target._scratch, token_state=state.token,
            pos_state=state.pos, prev_state=self._prev if self._lagged else None, out=out, impl=self._finish_impl,
        )  # fmt: skip
