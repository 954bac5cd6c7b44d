"""Reference generation: a plain loop of one-token steps over a KV cache (gpt-fast style).

This is the truth the serving engine is compared with: same model step (`GPT.forward_cached`), same
sampler (`model.sampling.sample`), same stop-string rule (`model.stop_strings.StopStringMatcher`).
The repetition penalty sees the whole context (prompt and generated tokens).

When the context fills the model's block_size, the cache is rebuilt from the last block_size // 2
tokens and generation goes on (nanoGPT crops to the last block_size tokens on every step instead;
the halving keeps the cost linear and differs only past block_size tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from model.kv_cache import KVCache
from model.sampling import SamplingParams, request_seed, sample
from model.stop_strings import StopStringMatcher
from model.tokenizers import IncrementalDecoder, Tokenizer
from model.transformer import GPT

__all__ = ["generate", "generate_tokens", "stream_tokens"]


def _prefill(model: GPT, cache: KVCache, ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Write `ids` into slot 0 from position 0; return the next-token logits (1, V)."""
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    return model.forward_cached(idx, cache, zero, zero, last_only=True)


@torch.inference_mode()
def stream_tokens(model: GPT, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
    """Yield up to `params.max_new_tokens` new token ids after `prompt_ids` (stop strings not applied:
    they need text, see `generate`). Puts the model in eval mode."""
    config = model.config
    if len(prompt_ids) == 0:
        raise ValueError("prompt must hold at least 1 token")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}), got {bad[:5]}")
    model.eval()
    param = next(model.parameters())
    device = param.device
    cache = KVCache(1, config, dtype=param.dtype if param.is_floating_point() else torch.float32, device=device)
    seed = request_seed(params)
    context = list(prompt_ids)
    window = context[-config.block_size :]
    logits = _prefill(model, cache, window, device)  # (1, V)
    length = len(window)  # tokens now in the cache
    penalise = params.repetition_penalty != 1.0
    for i in range(params.max_new_tokens):
        token = int(sample(logits, [params], [seed], [len(context)], [context] if penalise else None)[0])
        context.append(token)
        yield token
        if i == params.max_new_tokens - 1:
            return
        if length == cache.max_len:
            window = context[-(config.block_size // 2) or -1 :]
            logits = _prefill(model, cache, window, device)
            length = len(window)
            continue
        idx = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
        pos = torch.tensor([length], dtype=torch.long, device=device)
        logits = model.forward_cached(idx, cache, torch.zeros_like(pos), pos, last_only=True)  # (1, V)
        length += 1


def generate_tokens(model: GPT, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
    """The new token ids (not the prompt), exactly `max_new_tokens` of them; stop strings not applied."""
    return list(stream_tokens(model, prompt_ids, params))


def generate(model: GPT, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> str:
    """The text generated after `prompt`, ended by max_new_tokens or the first stop string (which is
    not included)."""
    decoder = IncrementalDecoder(tokenizer)
    matcher = StopStringMatcher(params.stop)
    out = []
    for token in stream_tokens(model, tokenizer.encode(prompt), params):
        out.append(matcher.push(decoder.push([token])))
        if matcher.stopped:
            return "".join(out)
    out.append(matcher.push(decoder.flush()))
    return "".join(out) + matcher.flush()
