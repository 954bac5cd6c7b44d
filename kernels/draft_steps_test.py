"""The draft's k + 1 steps in one launch (Triton; the interpreter on CPU) against `GPT.forward_cached` run step by step
with the same drafts fed back: a fresh random `tiny`-shaped model (4 layers x 128, 4 heads / 2 KV heads, SwiGLU,
tied embeddings, vocab 65) with sharpened weights, float32 weights and cache; rows at different positions and slots
in one call over caches holding real prompts; greedy drafts identical, sampled q within 1e-4 and draws equal to the
runner's inverse CDF over the reference q; every K/V written equal; the attention's inputs (cache contents, position)
change the output; bf16 weights and cache stay within bf16's rounding; unsupported models are refused by name. On a
GPU the same tests run the compiled kernel on the device."""

import pytest
import torch

from inference_svc.speculative_resident import draw
import kernels.draft_steps as ds
from kernels.draft_steps import DraftModel, draft_steps
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.transformer import GPT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel in the interpreter on CPU; on a GPU, compiled
TOL = dict(atol=1e-4, rtol=1e-4)
_LLAMA = dict(bias=False, norm="rmsnorm", pos="rope", mlp="swiglu", tie_weights=True, rope_theta=10000.0)
TINY = dict(vocab_size=65, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, **_LLAMA)  # `tiny` at 65


def _model(seed: int = 0, **changes) -> GPT:
    """A random-init model, its weights scaled so that the logits are spread and attention is far from uniform."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY, **changes})).eval().to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)  # sharp attention: which keys a query sees matters
            elif name.endswith("weight") and p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture(autouse=True)
def _true_fp32_matmuls(monkeypatch):
    """On a GPU the reference's float32 matmuls in full precision (not TF32, which a trainer run may leave on)."""
    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def tiny():
    model = _model()
    return model, DraftModel(model)


def _prefilled(model: GPT, n_slots: int, fills: dict[int, int], seed: int) -> KVCache:
    """A cache whose slots hold random prompts (slot -> length), written by the model's own prefill; the rest noise."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(n_slots, model.config, device=DEVICE)
    with torch.no_grad():
        cache.k.copy_(torch.randn(cache.k.shape, generator=g))  # stale garbage past each row's position
        cache.v.copy_(torch.randn(cache.v.shape, generator=g))
        for slot, n in fills.items():
            if n:
                ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(DEVICE)
                model.forward_cached(ids, cache, torch.tensor([slot], device=DEVICE), torch.tensor([0], device=DEVICE))
    return cache


def _clone(cache: KVCache, model: GPT) -> KVCache:
    other = KVCache(cache.n_slots, model.config, device=DEVICE)
    other.k.copy_(cache.k)
    other.v.copy_(cache.v)
    return other


ROWS = dict(slots=[2, 0, 4], pos=[0, 7, 41])  # a row at position 0 (no cached key), and rows in the middle


def _case(model: GPT, seed: int):
    slots, pos = torch.tensor(ROWS["slots"], device=DEVICE), torch.tensor(ROWS["pos"], device=DEVICE)
    cache = _prefilled(model, 5, dict(zip(ROWS["slots"], ROWS["pos"])), seed)
    x0 = torch.randint(0, 65, (3,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return cache, slots, pos, x0


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_drafts_and_cache_equal_forward_cached_step_by_step(tiny, k):
    model, packed = tiny
    cache, slots, pos, x0 = _case(model, seed=k)
    ref_cache = _clone(cache, model)
    blocked = torch.arange(65, device=DEVICE) >= 60  # ids never drafted
    got, q = draft_steps(packed, cache, slots, pos, x0, k, span=64, blocked=blocked, impl="triton")
    want, _ = draft_steps(packed, ref_cache, slots, pos, x0, k, span=64, blocked=blocked, impl="reference")
    assert q is None and got.shape == (3, k) and got.dtype == torch.long
    assert torch.equal(got, want)
    assert got.max() < 60
    assert len(set(got.flatten().tolist())) > 1  # not one id over and over: the picks depend on the input
    torch.testing.assert_close(cache.k, ref_cache.k, **TOL)  # every position of every slot: k + 1 written per row
    torch.testing.assert_close(cache.v, ref_cache.v, **TOL)
    noise = _prefilled(model, 5, {}, seed=k).k  # the same garbage, no prompts
    for s, p in zip(slots.tolist(), pos.tolist()):  # and the writes landed where they belong
        assert not torch.equal(cache.k[s, :, :, p + k], noise[s, :, :, p + k])


@pytest.mark.parametrize(
    "n_head, n_kv_head, tile, together",
    [(4, 4, 4096, 1), (4, 1, 4096, 2), (8, 2, 4096, 4), (8, 2, 1024, 1)],
    ids=["mha", "mqa-2-at-a-time", "gqa-4", "gqa-4-one-at-a-time"],
)
def test_every_head_grouping_matches(n_head, n_kv_head, tile, together, monkeypatch):
    """Query heads of a KV head run together in the kernel (its keys and values read once), as many as keep the
    out-projection tile (heads, head_dim, n_embd) within 2 tiles: MHA, MQA (2 of 4 at a time), 4 heads a group, and
    (smaller tiles) a group taken one head at a time."""
    monkeypatch.setattr(ds, "TILE_ELEMS", tile)
    model = _model(seed=9, n_layer=2, n_head=n_head, n_kv_head=n_kv_head)
    packed = DraftModel(model)
    assert ds._heads_at_a_time(packed) == together
    cache, slots, pos, x0 = _case(model, seed=9)
    ref_cache = _clone(cache, model)
    greedy = torch.tensor([True, False, False], device=DEVICE)
    u = torch.rand(3, 2, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    args = dict(greedy=greedy, temperature=torch.ones(3, device=DEVICE), uniforms=u)
    got, q = draft_steps(packed, cache, slots, pos, x0, 2, span=64, impl="triton", **args)
    want, q_ref = draft_steps(packed, ref_cache, slots, pos, x0, 2, span=64, impl="reference", **args)
    torch.testing.assert_close(q, q_ref, **TOL)
    assert torch.equal(got, want)
    torch.testing.assert_close(cache.k, ref_cache.k, **TOL)
    torch.testing.assert_close(cache.v, ref_cache.v, **TOL)


def test_sampled_rows_draw_from_q_by_inverse_cdf(tiny):
    model, packed = tiny
    k = 3
    cache, slots, pos, x0 = _case(model, seed=11)
    ref_cache = _clone(cache, model)
    greedy = torch.tensor([False, True, False], device=DEVICE)
    temperature = torch.tensor([[0.7], [1.0], [1.6]], device=DEVICE)
    u = torch.rand(3, k, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    args = dict(greedy=greedy, temperature=temperature, uniforms=u)
    got, q = draft_steps(packed, cache, slots, pos, x0, k, span=64, impl="triton", **args)
    want, q_ref = draft_steps(packed, ref_cache, slots, pos, x0, k, span=64, impl="reference", **args)
    assert q.shape == (3, k, 65)
    torch.testing.assert_close(q, q_ref, **TOL)
    assert torch.equal(got, want)
    torch.testing.assert_close(cache.k, ref_cache.k, **TOL)
    torch.testing.assert_close(cache.v, ref_cache.v, **TOL)
    for j in range(k):  # the runner's own draw over the reference q, same uniforms
        assert torch.equal(got[:, j], draw(q_ref[:, j], u[:, j]))
    assert torch.equal(
        q[1], torch.zeros(k, 65, device=DEVICE).scatter_(1, got[1][:, None], 1.0)
    )  # greedy row: one-hot on its pick
    assert (q[0].max(dim=-1).values < 0.999).all()  # sampled rows: spread, so the draws are real draws
    assert torch.allclose(q.sum(-1), torch.ones(3, k, device=DEVICE))


def test_attention_matters_cache_contents_and_position_change_the_output(tiny):
    """A wrong attention (keys ignored, the wrong slot or span) would pass a check on a model whose output does not
    depend on its context: here the same inputs over other cache contents, or at another position, give other q."""
    model, packed = tiny
    k, greedy = 2, torch.zeros(3, dtype=torch.bool, device=DEVICE)
    slots, x0 = torch.tensor([2, 0, 4], device=DEVICE), torch.tensor([5, 5, 5], device=DEVICE)
    u = torch.full((3, k), 0.5, device=DEVICE)
    args = dict(greedy=greedy, temperature=torch.ones(3, device=DEVICE), uniforms=u)
    runs = {}
    for name, seed, pos in (("a", 1, [20, 20, 20]), ("b", 2, [20, 20, 20]), ("later", 1, [30, 30, 30])):
        cache = _prefilled(model, 5, {s: 40 for s in slots.tolist()}, seed)
        at = torch.tensor(pos, device=DEVICE)
        runs[name] = draft_steps(packed, cache, slots, at, x0, k, span=64, impl="triton", **args)[1]
    assert (runs["a"] - runs["b"]).abs().amax() > 0.05  # other keys and values before the position
    assert (runs["a"] - runs["later"]).abs().amax() > 0.05  # more keys, other RoPE angles


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(bias=True, norm="layernorm", pos="learned", mlp="gelu"), ["bias", "layernorm", "learned", "gelu"]),
        (dict(mlp="relu2"), ["relu2"]),
        (dict(qk_norm=True), ["qk_norm"]),
        (dict(n_embd=96, n_head=4, n_kv_head=2), ["n_embd", "power of two"]),
        (dict(vocab_size=10000), ["vocab_size", "8192"]),
    ],
)
def test_an_unsupported_model_is_refused_by_name(changes, words):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "vocab_size": 65, "n_layer": 1, **changes}))
    with pytest.raises(ValueError) as err:
        DraftModel(model)
    for word in words:
        assert word in str(err.value)


def test_bad_arguments_are_refused(tiny):
    model, packed = tiny
    cache, slots, pos, x0 = _case(model, seed=3)
    with pytest.raises(ValueError, match="span"):
        draft_steps(packed, cache, slots, pos, x0, 2, span=1000)
    with pytest.raises(ValueError, match="slots"):
        draft_steps(packed, cache, slots[:2], pos, x0, 2, span=64)
    with pytest.raises(ValueError, match="uniforms"):
        draft_steps(packed, cache, slots, pos, x0, 2, span=64, greedy=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="DraftModel"):
        draft_steps(model, cache, slots, pos, x0, 2, span=64)


def test_bf16_weights_and_cache_stay_close_to_the_bf16_model():
    """The serving dtype: bf16 weights and cache (the kernel reads both in their dtype, computes in float32, stores the
    cache in bf16; eager rounds every op to bf16): q, the caches and the drafts agree within bf16's rounding."""
    model = _model(seed=4).to(torch.bfloat16)
    packed = DraftModel(model)
    assert packed.wq.dtype == torch.bfloat16
    k = 3
    cache, slots, pos, x0 = _case(model, seed=7)
    cache.k, cache.v = cache.k.to(torch.bfloat16), cache.v.to(torch.bfloat16)
    ref_cache = _clone(cache, model)
    ref_cache.k, ref_cache.v = cache.k.clone(), cache.v.clone()
    greedy = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    u = torch.rand(3, k, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    args = dict(greedy=greedy, temperature=torch.full((3, 1), 1.5, device=DEVICE), uniforms=u)
    got, q = draft_steps(packed, cache, slots, pos, x0, k, span=64, impl="triton", **args)
    want, q_ref = draft_steps(packed, ref_cache, slots, pos, x0, k, span=64, impl="reference", **args)
    assert cache.k.dtype == torch.bfloat16
    torch.testing.assert_close(q, q_ref, atol=3e-2, rtol=0)
    assert torch.equal(got, want)
    for got_kv, want_kv in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
        # a few values of the later steps' deeper layers drift by ~0.06 (eager's rounding after every op compounds)
        torch.testing.assert_close(got_kv.float(), want_kv.float(), atol=0.1, rtol=3e-2)
        assert (got_kv.float() - want_kv.float()).abs().mean() < 1e-3
