"""One request's life inside the engine: its tokens, its KV-cache slot, its sampler state and its timings.

The scheduler moves a `Sequence` WAITING -> RUNNING -> FINISHED; the engine appends tokens and reads
the timings. Everything here is touched only by the engine thread, except `cancelled`, which a caller
thread may set (a plain bool store, read once per engine step).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from inference_svc.detokenizer import StreamingDetokenizer
from inference_svc.params import Request

__all__ = ["Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for a free slot
    RUNNING = "running"  # holds a slot; prefilled once `n_cached > 0`
    FINISHED = "finished"  # slot given back


@dataclass(eq=False)
class Sequence:
    """Mutable state of one request (identity-compared: two sequences are never equal)."""

    request: Request
    detokenizer: StreamingDetokenizer
    generator: torch.Generator | None  # the request's own RNG for speculative decoding's draws (None: unseeded)
    sink: Any  # where the engine puts this request's chunks (a queue.Queue)
    seed: int = 0  # the sampler's seed: the request's, or a random one (model.sampling.uniforms)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens whose keys/values are in the cache (prompt after prefill, then +1 per decode)
    draft_cached: int = 0  # the same in the speculative decoder's draft cache
    prefilled: int = 0  # prompt tokens in the cache (a long prompt goes in chunks: Engine prefill_chunk)
    launched: int = 0  # tokens sampled on the device so far: streamed, or still in flight (device-resident loop)
    cancelled: bool = False
    arrived_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each generated token
    prompt_len: int = field(init=False)  # read every step: a plain attribute, not a property
    request_id: str = field(init=False)  # the request's (read every token)
    # Output tokens at which the sequence ends by length: max_new_tokens, or fewer when the context fills first
    # (the engine sets it from its runner's context length; read every token).
    length_limit: int = field(init=False)

    greedy_plain: bool = field(init=False)  # temperature 0 and no repetition penalty: an argmax step serves it
    max_new_tokens: int = field(init=False)  # the request's (read every step)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.request.prompt_ids)
        params = self.request.params
        self.max_new_tokens = params.max_new_tokens
        self.length_limit = params.max_new_tokens
        self.request_id = self.request.request_id
        self.greedy_plain = params.temperature == 0.0 and params.repetition_penalty == 1.0

    @property
    def length(self) -> int:
        """Prompt plus generated tokens."""
        return self.prompt_len + len(self.output_ids)

    def tokens_from(self, start: int) -> list[int]:
        """Prompt-plus-output tokens from position `start` on, without copying the part before it."""
        if start >= self.prompt_len:
            return self.output_ids[start - self.prompt_len :]
        return [*self.request.prompt_ids[start:], *self.output_ids]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]
