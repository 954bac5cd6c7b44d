"""GPT.forward_cached's small-batch decode kernels (`small_batch_kernels`: fused GEMVs and the attention step) give
the logits and the KV cache of the usual in-place decode step: GPT-2 (LayerNorm, learned positions, GELU, biases),
Llama (RMSNorm, RoPE, SwiGLU, GQA, no biases) and modded-nanogpt (ReLU^2, QK-norm, untied head) flavours, batches 1..4
with every row at its own position (one at 0), over several greedy steps. Weights are moved away from their init
(norm weights of 1 and biases of 0 would hide a kernel that ignored them). On CPU the kernels run in Triton's
interpreter (model/conftest.py); the GPU test (shakespeare-char in bf16, captured in a CUDA graph) skips without one."""

import pytest
import torch

from kernels import decode_gemv
from model import transformer
from model.kv_cache import KVCache
from model.presets import get_preset
from model.testing import perturb_like_training
from model.transformer import GPT

FLAVOURS = {
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, n_head=2, n_kv_head=2),
    "llama-gqa": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_head=4, n_kv_head=2),
    "muon": dict(
        norm="layernorm", pos="learned", mlp="relu2", bias=True, n_head=2, n_kv_head=2, qk_norm=True, tie_weights=False
    ),
}
VOCAB, BLOCK, N_SLOTS = 40, 48, 6
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"  # where impl="triton" can run: the GPU, else the CPU interpreter
FP32 = dict(atol=1e-4, rtol=1e-4)


def trained_like(flavour: str, dtype=torch.float32, device: str = "cpu") -> GPT:
    torch.manual_seed(0)
    config = get_preset(
        "tiny", n_layer=3, n_embd=32, block_size=BLOCK, vocab_size=VOCAB, dropout=0.0, **FLAVOURS[flavour]
    )
    model = perturb_like_training(GPT(config)).to(device=device, dtype=dtype).eval()
    model.fuse_qkv()
    return model


def prefilled(model: GPT, lengths: list[int], seed: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """A cache whose slots hold random prompts of `lengths` (0: an empty slot) through the plain path, the other
    slots' buffers random (a stale slot may hold anything). Returns (cache, slots, positions)."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(N_SLOTS, model.config, dtype=dtype, device=device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    slots = torch.randperm(N_SLOTS, generator=g)[: len(lengths)].to(device)
    rows = [b for b, n in enumerate(lengths) if n > 0]
    if rows:
        T = max(lengths)
        prompts = torch.randint(0, VOCAB, (len(rows), T), generator=g).to(device)
        counts = torch.tensor([lengths[b] for b in rows], device=device)
        with torch.no_grad():
            model.forward_cached(prompts, cache, slots[rows], torch.zeros_like(counts), counts)
    return cache, slots, torch.tensor(lengths, device=device)


def copy_of(cache: KVCache, model: GPT) -> KVCache:
    """A second cache with the same contents (same dtype and device)."""
    twin = KVCache(cache.n_slots, model.config, cache.max_len, dtype=cache.k.dtype, device=cache.k.device)
    twin.k.copy_(cache.k)
    twin.v.copy_(cache.v)
    return twin


def decode(model, cache, slots, positions, tokens, steps, option):
    """Greedy steps from tokens (B,); returns the logits of every step (steps, B, V)."""
    out = []
    with torch.no_grad():
        for i in range(steps):
            logits = model.forward_cached(
                tokens[:, None], cache, slots, positions + i, attention_in_place=True, small_batch_kernels=option
            )[:, 0]
            out.append(logits.float())
            tokens = logits.argmax(-1)
    return torch.stack(out)


def spy(monkeypatch) -> list:
    """Records each call of the attention step kernel wrapper from forward_cached."""
    calls = []
    real = transformer.decode_attention_step
    monkeypatch.setattr(transformer, "decode_attention_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("lengths", [[5], [0, 17], [9, 0, 30, 2]], ids=["B1", "B2", "B4"])
def test_kernels_match_the_plain_step_fp32(flavour, lengths, monkeypatch):
    model = trained_like(flavour, device=DEVICE)
    cache, slots, positions = prefilled(model, lengths, seed=len(lengths))
    cache_ref = copy_of(cache, model)
    tokens = torch.randint(0, VOCAB, (len(lengths),), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    calls = spy(monkeypatch)
    steps = 3
    got = decode(model, cache, slots, positions, tokens, steps, "triton")
    assert len(calls) == steps * model.config.n_layer  # the kernels ran, not a silent fallback
    want = decode(model, cache_ref, slots, positions, tokens, steps, False)
    torch.testing.assert_close(got, want, **FP32)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(cache.k, cache_ref.k, **FP32)  # every slot: the rows' new keys, the rest untouched
    torch.testing.assert_close(cache.v, cache_ref.v, **FP32)


def test_references_match_too():
    model = trained_like("llama-gqa")
    cache, slots, positions = prefilled(model, [3, 11], seed=9)
    cache_ref = copy_of(cache, model)
    tokens = torch.tensor([1, 2])
    got = decode(model, cache, slots, positions, tokens, 2, "reference")
    torch.testing.assert_close(got, decode(model, cache_ref, slots, positions, tokens, 2, False), **FP32)


def test_bf16_tracks_the_plain_step():
    model = trained_like("gpt2", dtype=torch.bfloat16, device=DEVICE)
    cache, slots, positions = prefilled(model, [4, 20, 1], seed=3)
    cache_ref = copy_of(cache, model)
    tokens = torch.tensor([5, 6, 7], device=DEVICE)
    got = decode(model, cache, slots, positions, tokens, 1, "triton")
    want = decode(model, cache_ref, slots, positions, tokens, 1, False)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(cache.k.float(), cache_ref.k.float(), atol=3e-2, rtol=3e-2)


def test_falls_back_where_the_kernels_do_not_apply(monkeypatch):
    model = trained_like("gpt2")  # on CPU: "auto" there means the plain path
    cache, slots, positions = prefilled(model, [2, 3, 4], seed=5)
    tokens = torch.tensor([1, 2, 3])
    calls = spy(monkeypatch)
    decode(model, cache, slots, positions, tokens, 1, True)  # "auto" on CPU: the plain path
    monkeypatch.setattr(decode_gemv, "MAX_ROWS", 2)
    decode(model, cache, slots, positions, tokens, 1, "triton")  # 3 rows > MAX_ROWS
    monkeypatch.setattr(decode_gemv, "MAX_ROWS", 16)
    model.train()
    decode(model, cache, slots, positions, tokens, 1, "triton")  # training
    assert calls == []
    model.eval()
    with pytest.raises(ValueError, match="small_batch_kernels must be False, True or one of"):
        decode(model, cache, slots, positions, tokens, 1, "fast")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (shakespeare-char in bf16 inside a CUDA graph)")
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_shakespeare_char_graph_on_vs_off(batch):
    torch.manual_seed(0)
    model = GPT(get_preset("shakespeare-char", dropout=0.0)).to("cuda", torch.bfloat16).eval()
    model.fuse_qkv()
    g = torch.Generator().manual_seed(batch)
    slots = torch.arange(batch, device="cuda")
    positions = torch.randint(0, 200, (batch,), generator=g).cuda()
    tokens = torch.randint(0, 65, (batch, 1), generator=g).cuda()
    results = []
    for option in (False, True):
        cache = KVCache(batch + 1, model.config, dtype=torch.bfloat16, device="cuda")
        cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(2)))
        cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(3)))

        def step():
            return model.forward_cached(
                tokens, cache, slots, positions, attention_in_place=True, small_batch_kernels=option
            )[:, 0].float()

        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # compile, autotune
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = step()
            graph.replay()
            torch.cuda.synchronize()
        results.append((logits.clone(), cache.k.clone()))
    (off, k_off), (on, k_on) = results
    torch.testing.assert_close(on, off, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(k_on.float(), k_off.float(), atol=3e-2, rtol=3e-2)
