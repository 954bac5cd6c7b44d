"""Choosing the next token: validated per-request parameters and one batched sampler.

`sample()` takes a batch of logits with per-row parameters, seeds and positions, so the reference generator
and the serving engine (continuous batching: every row its own request) share exactly this code; the engine's
captured decode step calls its tensor core (`penalise`, `sample_rows`, `uniforms`) on device-resident state.
Order of operations, per row: repetition penalty -> temperature -> top-k -> top-p -> draw. The draw is one
uniform from a counter-based generator, a hash of (seed, position of the new token): no generator state to carry
between steps, the same draw on the host and inside a CUDA graph, and none of the batch's other rows matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.dispatch import Impl, use_triton
from kernels.sampling import MAX_VOCAB, SlotSettings, penalise, sample_slots_triton, uniforms
from model.field_checks import FieldError, check_int, check_number, is_int, is_number

__all__ = [
    "SamplingParams",
    "sample",
    "sample_rows",
    "sample_slots",
    "sample_slots_reference",
    "uniforms",
    "penalise",
    "seen_mask",
    "random_seed",
    "request_seed",
    "make_generator",
    "MAX_STOP_STRINGS",
]

MAX_STOP_STRINGS = 8
MAX_STOP_LEN = 256
MAX_NEW_TOKENS = 1 << 16
MAX_TEMPERATURE = 100.0
# Below these, logits / temperature (or * penalty) can overflow float32 to inf and the softmax to NaN.
MIN_TEMPERATURE = 1e-2
MAX_REPETITION_PENALTY = 10.0
MIN_REPETITION_PENALTY = 1e-2
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. temperature 0 is greedy; top_k 0 and top_p 1 are off;
    repetition_penalty 1 is off (CTRL-style: a seen token's logit is divided by it when positive,
    multiplied when negative); seed None draws from the global RNG; generation ends at any `stop` string."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        if not is_number(self.temperature) or not (
            self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE
        ):
            raise FieldError(
                "temperature",
                f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {self.temperature!r}",
            )
        check_int("top_k", self.top_k, 0, note=" (0 = off)")
        check_number("top_p", self.top_p, 0, 1, lo_open=True, note=" (1 = off)")
        check_number(
            "repetition_penalty",
            self.repetition_penalty,
            MIN_REPETITION_PENALTY,
            MAX_REPETITION_PENALTY,
            note=" (1 = off)",
        )
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise FieldError("seed", f"seed must be None or an integer in [0, 2**63 - 1], got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS:
            raise FieldError("stop", f"stop must be a list of at most {MAX_STOP_STRINGS} strings, got {self.stop!r}")
        for s in stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_LEN:
                raise FieldError("stop", f"each stop string must have 1 to {MAX_STOP_LEN} characters, got {s!r}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (use the global RNG) when seed is None. Speculative
    decoding's draws (draft tokens, acceptance) use it; `sample` uses `uniforms`."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def random_seed() -> int:
    """A seed for an unseeded request, drawn from torch's global CPU generator (so `torch.manual_seed` makes
    unseeded runs repeat)."""
    return int(torch.randint(0, MAX_SEED, (), dtype=torch.long))


def request_seed(params: SamplingParams) -> int:
    """The seed a request draws with: its own, or a fresh `random_seed()` when it has none."""
    return params.seed if params.seed is not None else random_seed()


def seen_mask(prev_tokens: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, V) bool: True where row b's context holds the token (what the repetition penalty looks at)."""
    seen = torch.zeros(len(prev_tokens), vocab, dtype=torch.bool, device=device)
    for b, ids in enumerate(prev_tokens):
        if ids:
            seen[b, torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
    return seen


def sample_rows(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """The sampler on tensors alone (no host sync, so it can be captured in a CUDA graph): logits (B, V) float32
    (penalty already applied), greedy (B,) bool, temperature (B, 1) float32 (any value on greedy rows), top_k
    (B, 1) long (V = off), top_p (B, 1) float32, u (B,) the rows' uniforms. Returns (B,) long."""
    V = logits.shape[-1]
    greedy_tokens = logits.argmax(dim=-1)  # (B,)
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)  # (B, V)
    rank = torch.arange(V, device=logits.device)[None, :]  # (1, V)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = torch.cumsum(probs, dim=-1)  # (B, V), unnormalised
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)  # (B, 1) index into the sorted order
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1  # kept tokens are a prefix of the sorted order
    pick = torch.minimum(pick, last_kept.clamp(min=0))  # guards u rounding up to the total
    sampled = order.gather(1, pick)[:, 0]  # (B,)
    # Total over any logits: a row whose distribution is not a number (NaN/inf logits from the model, or an
    # overflow) falls back to its greedy token instead of failing the batch.
    total = cdf[:, -1]  # (B,)
    degenerate = ~torch.isfinite(total) | (total <= 0)
    return torch.where(greedy | degenerate, greedy_tokens, sampled)


def sample(
    logits: torch.Tensor,
    params_list: Sequence[SamplingParams],
    seeds: Sequence[int] | None = None,
    counters: Sequence[int] | None = None,
    prev_tokens: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits (B, V) any float dtype; params_list, seeds, counters, prev_tokens have one
    entry per row: `seeds` the rows' generator seeds (None: fresh `random_seed()`s), `counters` the position of the
    token each row draws (None: 0), `prev_tokens` the ids already in each row's context (for the repetition
    penalty; None: no penalty). Returns (B,) long. The draw is `uniforms(seed, counter)`, so a row's token is a
    function of its logits, parameters, seed and position alone."""
    B, V = logits.shape
    assert len(params_list) == B, f"need one SamplingParams per row: {len(params_list)} for {B} rows"
    assert prev_tokens is None or len(prev_tokens) == B, f"prev_tokens needs {B} rows, got {len(prev_tokens)}"
    seeds = [random_seed() for _ in range(B)] if seeds is None else seeds
    counters = [0] * B if counters is None else counters
    assert len(seeds) == B and len(counters) == B, f"need one seed and one counter per row for {B} rows"
    device = logits.device
    logits = logits.float()
    if prev_tokens is not None and any(p.repetition_penalty != 1.0 for p in params_list):
        penalty = torch.tensor([p.repetition_penalty for p in params_list], device=device)[:, None]  # (B, 1)
        logits = penalise(logits, seen_mask(prev_tokens, V, device), penalty)
    greedy = torch.tensor([p.temperature == 0.0 for p in params_list], device=device)
    if all(p.temperature == 0.0 for p in params_list):
        return logits.argmax(dim=-1)
    temperature = torch.tensor([p.temperature or 1.0 for p in params_list], device=device)[:, None]  # (B, 1)
    top_k = torch.tensor([p.top_k or V for p in params_list], device=device)[:, None]  # (B, 1)
    top_p = torch.tensor([p.top_p for p in params_list], device=device)[:, None]  # (B, 1)
    u = uniforms(torch.tensor(list(seeds), device=device), torch.tensor(list(counters), device=device))
    return sample_rows(logits, greedy, temperature, top_k, top_p, u)


def sample_slots_reference(
    logits: torch.Tensor, slots: torch.Tensor, counters: torch.Tensor, settings: SlotSettings
) -> torch.Tensor:
    """The serving loop's sampler over per-slot settings in PyTorch (sorts every row): logits (B, V) float32 of the
    rows in `slots` (B,) long; counters (B,) long, each row's draw counter."""
    blocked, seen, penalty, greedy, temperature, top_k, top_p, seed = settings
    logits = logits.masked_fill(blocked, float("-inf"))  # ids the tokenizer cannot decode
    logits = penalise(logits, seen[slots], penalty[slots])
    u = uniforms(seed[slots], counters)
    return sample_rows(logits, greedy[slots], temperature[slots], top_k[slots], top_p[slots], u)


def sample_slots(
    logits: torch.Tensor, slots: torch.Tensor, counters: torch.Tensor, settings: SlotSettings, impl: Impl = "auto"
) -> torch.Tensor:
    """Next token (B,) int64 of each row: `kernels.sampling`'s one-launch kernel on CUDA ("auto"), the reference
    elsewhere (token for token the same, up to rounding at a boundary)."""
    if use_triton(impl, logits, supported=logits.shape[-1] <= MAX_VOCAB):
        return sample_slots_triton(logits, slots, counters, settings)
    return sample_slots_reference(logits, slots, counters, settings)
