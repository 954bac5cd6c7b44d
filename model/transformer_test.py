"""Tests of the transformer: shapes, loss, tying, and cached decoding against the full forward."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.kv_cache import KVCache
from model.presets import get_preset
from model.layers import apply_rope, attention, split_cache_attention
from model.transformer import GPT

LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
NANOGPT = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)
# shakespeare-char-muon's flavour: nanoGPT's with QK-norm, a ReLU² MLP and an untied head
MODDED = dict(norm="layernorm", pos="learned", mlp="relu2", bias=True, qk_norm=True, tie_weights=False)
LLAMA_QK = dict(LLAMA, qk_norm=True)


def _config(n_kv_head: int, flavour: dict, **kw) -> ModelConfig:
    base = dict(vocab_size=37, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, block_size=24, dropout=0.0)
    return ModelConfig(**{**base, **flavour, **kw})


def _model(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def test_forward_shapes_and_loss():
    model = _model(_config(2, LLAMA))
    idx = torch.randint(0, 37, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 37) and loss is None
    _, loss = model(idx, targets=torch.randint(0, 37, (3, 10)))
    # An untrained model with small init predicts close to uniform: loss near ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(37.0)).item()) < 0.5


def test_ignore_index_targets():
    model = _model(_config(4, NANOGPT))
    idx = torch.randint(0, 37, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 37), idx[:, :4].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_weight_tying():
    tied = _model(_config(4, LLAMA, tie_weights=True))
    untied = _model(_config(4, LLAMA, tie_weights=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 37 * 32


def test_causality():
    """Changing a later token never changes earlier logits."""
    model = _model(_config(2, LLAMA))
    idx = torch.randint(0, 37, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 37
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_shakespeare_char_param_count():
    model = GPT(get_preset("shakespeare-char"))
    # nanoGPT's baby GPT with biases: 10.67M without the position table, 10.77M with it.
    assert model.num_params(non_embedding=True) == 10_672_512
    assert model.num_params() == 10_672_512 + 256 * 384


@pytest.mark.parametrize("flavour", [LLAMA, NANOGPT, MODDED, LLAMA_QK], ids=["llama", "nanogpt", "modded", "llama-qk"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cached_decoding_matches_full_forward(n_kv_head, flavour):
    """Batched right-padded prefill, a chunked step, then single-token decode with every row at a
    different position: each valid logit equals the full forward's within 1e-5 (fp32)."""
    config = _config(n_kv_head, flavour)
    model = _model(config, seed=n_kv_head)
    g = torch.Generator().manual_seed(1)
    total = [17, 12, 20]  # final lengths of the three sequences
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in total]
    with torch.no_grad():
        full = [model(s[None])[0][0] for s in seqs]  # each (n, V)

    cache = KVCache(4, config, max_len=config.block_size)
    slots = torch.tensor([2, 0, 3])
    done = [0, 0, 0]

    def step(counts: list[int]) -> None:
        """Feed the next counts[b] tokens of each row in one right-padded batch and check its logits."""
        T = max(counts)
        idx = torch.zeros(3, T, dtype=torch.long)
        for b, n in enumerate(counts):
            idx[b, :n] = seqs[b][done[b] : done[b] + n]
        with torch.no_grad():
            logits = model.forward_cached(idx, cache, slots, torch.tensor(done), torch.tensor(counts))
        for b, n in enumerate(counts):
            torch.testing.assert_close(logits[b, :n], full[b][done[b] : done[b] + n], rtol=0, atol=1e-5)
            done[b] += n

    step([5, 2, 7])  # prefill of different lengths
    step([3, 4, 1])  # a chunked-prefill step
    while min(a - d for a, d in zip(total, done)) > 0:
        step([1, 1, 1])  # decode: rows at positions that all differ


def test_last_only_and_kv_len():
    config = _config(2, LLAMA)
    model = _model(config)
    idx = torch.randint(0, 37, (2, 6))
    lengths = torch.tensor([6, 3])
    cache = KVCache(2, config)
    with torch.no_grad():
        all_logits = model.forward_cached(idx, cache, torch.tensor([0, 1]), torch.tensor([0, 0]), lengths)
        cache.reset()
        last = model.forward_cached(
            idx, cache, torch.tensor([0, 1]), torch.tensor([0, 0]), lengths, kv_len=8, last_only=True
        )
    assert last.shape == (2, 37)
    torch.testing.assert_close(last[0], all_logits[0, 5], rtol=0, atol=1e-5)
    torch.testing.assert_close(last[1], all_logits[1, 2], rtol=0, atol=1e-5)


def test_cached_rejects_overflow():
    config = _config(2, LLAMA)
    model = _model(config)
    cache = KVCache(1, config, max_len=8)
    with pytest.raises(AssertionError, match="beyond kv_len"):
        model.forward_cached(torch.zeros(1, 4, dtype=torch.long), cache, torch.tensor([0]), torch.tensor([6]))


def test_qk_norm_and_relu2_compute_what_they_say():
    """QK-norm: the attention of q, k scaled to unit RMS per head before RoPE; ReLU²: down(relu(up(x))**2)."""
    config = _config(2, LLAMA_QK, mlp="relu2")
    model = _model(config)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    x = torch.randn(2, 9, 32)
    rope = model._rope(torch.arange(9)[None], x.dtype)
    with torch.no_grad():
        B, T, H, Hkv, D = 2, 9, 4, 2, 8
        q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        q = q / q.pow(2).mean(-1, keepdim=True).add(config.norm_eps).sqrt()
        k = k / k.pow(2).mean(-1, keepdim=True).add(config.norm_eps).sqrt()
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / D**0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 32)
        torch.testing.assert_close(attn(x, rope), attn.o_proj(y), rtol=0, atol=1e-5)
        torch.testing.assert_close(mlp(x), mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2), rtol=0, atol=1e-6)
        plain = _model(config.replace(qk_norm=False))
        assert not torch.allclose(plain.blocks[0].attn(x, rope), attn(x, rope), atol=1e-3)  # the norm does act
    assert config.hidden_dim == 4 * 32 and not any("mlp.gate_proj" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_split_cache_attention_equals_attention_over_the_concatenation(n_kv_head):
    """Scores against a fixed buffer (masked to each row's length) and the new tokens (causal), one softmax: the same
    as attention over each row's valid past concatenated with its new K/V. Sharp scores (scaled q), lengths 0, 3, 9."""
    g = torch.Generator().manual_seed(0)
    B, H, T, S, D = 3, 4, 3, 9, 8
    q = 4 * torch.randn(B, H, T, D, generator=g)
    k_past, v_past = torch.randn(2, B, n_kv_head, S, D, generator=g)
    k_new, v_new = torch.randn(2, B, n_kv_head, T, D, generator=g)
    lengths = torch.tensor([0, 3, 9])
    got = split_cache_attention(q, k_past, v_past, lengths, k_new, v_new)
    for b, n in enumerate(lengths.tolist()):
        k = torch.cat((k_past[b : b + 1, :, :n], k_new[b : b + 1]), dim=2)  # (1, Hkv, n + T, D)
        v = torch.cat((v_past[b : b + 1, :, :n], v_new[b : b + 1]), dim=2)
        mask = torch.arange(n + T)[None, :] <= n + torch.arange(T)[:, None]  # (T, n + T)
        torch.testing.assert_close(got[b : b + 1], attention(q[b : b + 1], k, v, mask=mask), rtol=0, atol=1e-5)
