"""Fault injection: one request whose runner or sampler step raises ends alone with FINISH_REASON_ERROR and its
message, while 16 others in flight with it finish exactly as they would have without it (issue 22, finding 1)."""

from __future__ import annotations

import pytest

from inference_svc.engine import Engine, FinishReason
from inference_svc.params import make_request
from inference_svc.runner import TorchRunner
from inference_svc.sampler import Sampler
from model.generate import generate_tokens
from model.sampling import SamplingParams

N_GOOD = 16
POISON = "whether"  # the prompt of the one bad request


class _FaultyRunner(TorchRunner):
    """Raises on any prefill or decode step that includes `bad_slot` (set once the poisoned request is admitted), on
    the logits path (prefill, decode) and on the device-resident one (prefill_sample, decode_sample; "sampler": the
    sampling inside the resident step)."""

    bad_prompt: tuple[int, ...] = ()
    bad_slot: int | None = None
    phase = "decode"

    def _admit(self, slots, prompts):
        for slot, prompt in zip(slots, prompts):
            if tuple(prompt) == self.bad_prompt:
                self.bad_slot = slot
        if self.phase == "prefill" and self.bad_slot in slots:
            raise RuntimeError("injected prefill fault")

    def prefill(self, slots, prompts):
        self._admit(slots, prompts)
        return super().prefill(slots, prompts)

    def decode(self, slots, tokens, positions):
        if self.phase == "decode" and self.bad_slot in slots:
            raise RuntimeError("injected decode fault")
        return super().decode(slots, tokens, positions)

    def prefill_sample(self, slots, prompts, params, seeds, starts=None):
        self._admit(slots, prompts)
        if self.phase == "sampler" and self.bad_slot in slots:
            raise ValueError("injected sampler fault")
        return super().prefill_sample(slots, prompts, params, seeds, starts)

    def decode_sample(self, slots, kv_len, full, steps=1):
        if self.phase in ("decode", "sampler") and self.bad_slot in slots:
            raise (RuntimeError if self.phase == "decode" else ValueError)(f"injected {self.phase} fault")
        return super().decode_sample(slots, kv_len, full, steps)

    def release(self, slot):
        if slot == self.bad_slot:
            self.bad_slot = None
        super().release(slot)


class _FaultySampler(Sampler):
    """Raises on any step whose rows include the poisoned request."""

    bad_prompt: tuple[int, ...] = ()

    def sample(self, logits, seqs):
        if any(seq.request.prompt_ids == self.bad_prompt for seq in seqs):
            raise ValueError("injected sampler fault")
        return super().sample(logits, seqs)


def _params(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_new_tokens=8 + i, temperature=0.9, top_k=10, seed=i)
    return SamplingParams(max_new_tokens=8 + i, temperature=0.0, repetition_penalty=1.2 if i % 4 else 1.0)


@pytest.mark.parametrize(
    "resident, steps", [(True, 1), (True, 3), (False, 1)], ids=["resident", "multi-step", "logits"]
)
@pytest.mark.parametrize("where", ["prefill", "decode", "sampler"])
def test_one_failing_request_ends_alone(tiny, where, resident, steps):
    prompts = [("to be, or not"[: 2 + i % 10] + " ") for i in range(N_GOOD)]
    bad_prompt = tuple(tiny.tokenizer.encode(POISON))
    runner = _FaultyRunner(tiny.model, n_slots=N_GOOD + 1)
    runner.bad_prompt, runner.phase = bad_prompt, where
    with Engine(runner, tiny.tokenizer, max_queue=64, resident=resident, decode_steps=steps) as engine:
        if where == "sampler":
            engine.sampler = _FaultySampler(runner.device, vocab_size=tiny.tokenizer.vocab_size)
            engine.sampler.bad_prompt = bad_prompt
        context = tiny.model.config.block_size
        handles = [
            engine.submit(make_request(p, _params(i), tokenizer=tiny.tokenizer, context_len=context))
            for i, p in enumerate(prompts[: N_GOOD // 2])
        ]
        bad = engine.submit(
            make_request(POISON, SamplingParams(max_new_tokens=30), tokenizer=tiny.tokenizer, context_len=context)
        )
        handles += [
            engine.submit(make_request(p, _params(i), tokenizer=tiny.tokenizer, context_len=context))
            for i, p in enumerate(prompts[N_GOOD // 2 :], start=N_GOOD // 2)
        ]
        failed = bad.result()
        assert failed.finish_reason is FinishReason.ERROR
        assert "injected" in failed.error and failed.error.startswith(("RuntimeError", "ValueError"))
        for i, (prompt, handle) in enumerate(zip(prompts, handles)):
            done = handle.result()
            assert done.finish_reason is FinishReason.LENGTH and done.error == "", f"request {i}: {done.error}"
            expected = generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), _params(i))
            assert list(done.token_ids) == expected, f"request {i}"
        stats = engine.stats()
        assert stats.finished["error"] == 1 and stats.finished["length"] == N_GOOD
        assert (stats.free_slots, stats.running, stats.in_flight) == (N_GOOD + 1, 0, 0)
