"""Tests of reference generation: the cached loop agrees with a cache-free loop; stops; seeds."""

from __future__ import annotations

import pytest
import torch

from model.generate import generate, generate_tokens
from model.sampling import SamplingParams
from model.tokenizers import ByteTokenizer, CharTokenizer
from model.transformer import GPT
from model.testing import llama_test_config


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = llama_test_config(vocab_size=256, block_size=32, tie_weights=False)
    return GPT(config).eval()


def _greedy_without_cache(model: GPT, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids[-model.config.block_size :]]))
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def test_cached_greedy_matches_full_forward_loop(model):
    prompt = [5, 70, 101, 33]
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    assert generate_tokens(model, prompt, params) == _greedy_without_cache(model, prompt, 20)


def test_runs_past_block_size(model):
    out = generate_tokens(model, [1, 2, 3], SamplingParams(max_new_tokens=80, temperature=0.0))
    assert len(out) == 80
    # Up to the first re-window (context = block_size) it is the plain greedy continuation.
    assert out[:29] == _greedy_without_cache(model, [1, 2, 3], 29)


def test_long_prompt_keeps_last_block(model):
    prompt = list(range(40, 90))  # 50 > block_size 32
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    assert generate_tokens(model, prompt, params) == generate_tokens(model, prompt[-32:], params)


def test_stop_string_cuts_output(model):
    tok = CharTokenizer([chr(0x100 + i) for i in range(256)])  # one printable character per id
    prompt = tok.decode([104, 105])
    full = generate(model, tok, prompt, SamplingParams(max_new_tokens=24, temperature=0.0))
    assert len(full) == 24
    stop = full[6:8]
    cut = generate(model, tok, prompt, SamplingParams(max_new_tokens=24, temperature=0.0, stop=(stop,)))
    assert cut == full[: full.index(stop)]
    assert stop not in cut


def test_seed_reproducible(model):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
    a = generate_tokens(model, [10, 20], p)
    assert a == generate_tokens(model, [10, 20], p)
    assert a != generate_tokens(model, [10, 20], SamplingParams(max_new_tokens=16, temperature=1.0, seed=4))


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="at least 1 token"):
        generate_tokens(model, [], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 256\)"):
        generate_tokens(model, [300], SamplingParams())


def test_generate_streams_utf8_safely(model):
    text = generate(model, ByteTokenizer(), "hi", SamplingParams(max_new_tokens=12, temperature=0.0))
    ids = generate_tokens(model, list(b"hi"), SamplingParams(max_new_tokens=12, temperature=0.0))
    assert text == bytes(ids).decode("utf-8", errors="replace")
