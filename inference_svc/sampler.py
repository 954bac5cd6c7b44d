"""The engine's sampling step: one batched call of `model.sampling.sample` (the one sampler the reference
generator also uses) over the rows of a step, each with its request's parameters and generator.

Logits stay on the device; the only host transfer is the sampled tokens (B ints), which the scheduler
needs anyway. Each row draws `model.sampling.uniforms(seed, position of its new token)`, as the reference
generator does, so a request's tokens do not depend on what else shares its batch. This is the sampler of
runners that hand back logits (ONNX Runtime, speculative decoding); `TorchRunner` samples inside its decode step.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from inference_svc.sequence import Sequence
from model.sampling import make_generator, sample

__all__ = ["Sampler"]


class Sampler:
    """Samples the next token of each sequence in a step on `device`.

    `vocab_size` is the tokenizer's: a model whose embedding is padded beyond it (vocab_size rounded up to
    a multiple of 64) never gets to emit an id the tokenizer cannot decode.
    """

    def __init__(self, device: torch.device | str, vocab_size: int | None = None) -> None:
        self.device = torch.device(device)
        self.vocab_size = vocab_size

    def generator(self, seed: int | None) -> torch.Generator | None:
        """A request's torch.Generator for speculative decoding's draws: seeded on the device like the reference's;
        None (the global RNG) when unseeded."""
        return make_generator(seed, self.device)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
        """logits (B, V) on the device, row b for seqs[b] -> the B next token ids."""
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            logits[:, self.vocab_size :] = float("-inf")  # padded ids: never sampled
        params = [seq.request.params for seq in seqs]
        # The repetition penalty sees the whole context (prompt and output), as in model.generate.
        penalise = any(p.repetition_penalty != 1.0 for p in params)
        prev = [[*seq.request.prompt_ids, *seq.output_ids] for seq in seqs] if penalise else None
        # Each row draws for the position of its new token, as the reference does.
        tokens = sample(logits, params, [seq.seed for seq in seqs], [seq.length for seq in seqs], prev)  # (B,)
        return tokens.tolist()
