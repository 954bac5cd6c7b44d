"""Choosing the next token: validated per-request parameters and one batched sampler.

`sample()` takes a batch of logits with per-row parameters and generators, so the reference generator
and the serving engine (continuous batching: every row its own request) share exactly this code.
Order of operations, per row: repetition penalty -> temperature -> top-k -> top-p -> draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.field_checks import FieldError, check_int, check_number, is_int, is_number

__all__ = ["SamplingParams", "sample", "make_generator", "MAX_STOP_STRINGS"]

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
    """A generator seeded with `seed` on `device`, or None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _apply_repetition_penalty(
    logits: torch.Tensor, params_list: Sequence[SamplingParams], prev_tokens: Sequence[Sequence[int]] | None
) -> torch.Tensor:
    """logits (B, V) float32, modified in place on rows whose penalty is not 1."""
    if prev_tokens is None:
        return logits
    for b, params in enumerate(params_list):
        if params.repetition_penalty == 1.0 or not prev_tokens[b]:
            continue
        seen = torch.as_tensor(list(set(prev_tokens[b])), dtype=torch.long, device=logits.device)
        row = logits[b, seen]
        logits[b, seen] = torch.where(row > 0, row / params.repetition_penalty, row * params.repetition_penalty)
    return logits


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row, each from its own generator (so a seeded row's draws do not depend on
    the rest of the batch). Returns (B,) float32 on `device`."""
    draws = []
    for g in generators:
        if g is None:
            draws.append(torch.rand(1, device=device))
        else:
            draws.append(torch.rand(1, generator=g, device=g.device).to(device))
    return torch.cat(draws) if draws else torch.empty(0, device=device)


def sample(
    logits: torch.Tensor,
    params_list: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    prev_tokens: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits (B, V) any float dtype; params_list, generators, prev_tokens have
    one entry per row (generators None = global RNG for all; prev_tokens = the ids already in each
    row's context, for the repetition penalty). Returns (B,) long."""
    B, V = logits.shape
    assert len(params_list) == B, f"need one SamplingParams per row: {len(params_list)} for {B} rows"
    assert prev_tokens is None or len(prev_tokens) == B, f"prev_tokens needs {B} rows, got {len(prev_tokens)}"
    generators = [None] * B if generators is None else generators
    assert len(generators) == B, f"need one generator (or None) per row: {len(generators)} for {B} rows"
    device = logits.device
    logits = _apply_repetition_penalty(logits.float().clone(), params_list, prev_tokens)  # (B, V)
    greedy_tokens = logits.argmax(dim=-1)  # (B,)
    greedy = torch.tensor([p.temperature == 0.0 for p in params_list], device=device)
    if bool(greedy.all()):
        return greedy_tokens

    temperature = torch.tensor([p.temperature or 1.0 for p in params_list], device=device)[:, None]  # (B, 1)
    top_k = torch.tensor([p.top_k or V for p in params_list], device=device)[:, None]  # (B, 1)
    top_p = torch.tensor([p.top_p for p in params_list], device=device)[:, None]  # (B, 1)
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)  # (B, V)
    rank = torch.arange(V, device=device)[None, :]  # (1, V)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = torch.cumsum(probs, dim=-1)  # (B, V), unnormalised
    u = _uniforms(generators, device)[:, None] * cdf[:, -1:]  # (B, 1)
    pick = torch.searchsorted(cdf, u, right=True)  # (B, 1) index into the sorted order
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1  # kept tokens are a prefix of the sorted order
    pick = torch.minimum(pick, last_kept.clamp(min=0))  # guards u rounding up to the total
    sampled = order.gather(1, pick)[:, 0]  # (B,)
    # Total over any logits: a row whose distribution is not a number (NaN/inf logits from the model, or an
    # overflow) falls back to its greedy token instead of failing the batch.
    total = cdf[:, -1]  # (B,)
    degenerate = ~torch.isfinite(total) | (total <= 0)
    return torch.where(greedy | degenerate, greedy_tokens, sampled)
