"""Tests of the slot-addressed KV cache buffers."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.kv_cache import KVCache

CONFIG = ModelConfig(vocab_size=10, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=16)


def test_shapes_dtype_and_not_in_state_dict():
    cache = KVCache(5, CONFIG, max_len=12, dtype=torch.bfloat16)
    assert cache.k.shape == cache.v.shape == (5, 3, 2, 12, 8)
    assert cache.k.dtype == torch.bfloat16
    assert cache.max_len == 12 and cache.n_slots == 5
    assert cache.state_dict() == {}
    assert KVCache(1, CONFIG).max_len == 16  # defaults to block_size


@pytest.mark.parametrize(
    "kw, words", [({"n_slots": 0}, "n_slots"), ({"max_len": 17}, r"max_len must be an integer in \[1, 16\]")]
)
def test_bad_sizes(kw, words):
    args = {"n_slots": 2, **kw}
    with pytest.raises(ValueError, match=words):
        KVCache(args.pop("n_slots"), CONFIG, **args)


def test_write_read_at_per_row_positions():
    cache = KVCache(3, CONFIG, max_len=8)
    k = torch.randn(2, 2, 8)  # two tokens: (N, Hkv, D)
    v = torch.randn(2, 2, 8)
    cache.write(1, torch.tensor([2, 0]), torch.tensor([5, 1]), k, v)
    torch.testing.assert_close(cache.k[2, 1, :, 5], k[0])
    torch.testing.assert_close(cache.v[0, 1, :, 1], v[1])
    assert cache.k[:, 0].abs().sum() == 0 and cache.k[:, 2].abs().sum() == 0  # other layers untouched
    keys, values = cache.read(1, torch.tensor([0, 2]), kv_len=6)
    assert keys.shape == values.shape == (2, 2, 6, 8)
    torch.testing.assert_close(keys[1, :, 5], k[0])


def test_write_layers_equals_a_write_per_layer():
    """Every layer's new key/value of each row in one call (the compiled CPU decode step's write), cast to the
    cache's dtype, exactly as one `write` per layer stores them."""
    one, per_layer = (
        KVCache(3, CONFIG, max_len=8, dtype=torch.bfloat16),
        KVCache(3, CONFIG, max_len=8, dtype=torch.bfloat16),
    )
    slots, pos = torch.tensor([2, 0]), torch.tensor([5, 1])
    k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)  # (N, n_layer, Hkv, D)
    one.write_layers(slots, pos, k, v)
    for layer in range(3):
        per_layer.write(layer, slots, pos, k[:, layer], v[:, layer])
    assert torch.equal(one.k, per_layer.k) and torch.equal(one.v, per_layer.v)
    assert one.k[2, :, :, 5].abs().min() > 0 and one.k[1].abs().sum() == 0  # written there, nowhere else
    assert one.k.abs().gt(0).sum() == 2 * 3 * 2 * 8


def test_reset_slots():
    cache = KVCache(3, CONFIG)
    cache.k.fill_(1.0)
    cache.v.fill_(1.0)
    cache.reset([1])
    assert cache.k[1].abs().sum() == 0 and cache.v[1].abs().sum() == 0
    assert bool((cache.k[0] == 1).all()) and bool((cache.v[2] == 1).all())
    cache.reset()
    assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0
