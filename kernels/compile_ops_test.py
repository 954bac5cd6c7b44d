"""The custom ops of kernels/compile_ops.py: torch.library.opcheck (schema, fake tensors, autograd registration, AOT
dispatch), forward and backward against the PyTorch references on fresh random inputs (flash attention's dropout
exactly against the kernel's own keep mask for the op's seed tensor), compiled with fullgraph, and on a GPU replayed
from CUDA graphs (torch.compile's reduce-overhead) with a fresh dropout mask in every replay."""

import pytest
import torch

from kernels import compile_ops
from kernels import flash_attention as fa
from kernels import fused_add_norm as fan
from kernels import sm90_compile_test as sm90

GPU = torch.cuda.is_available()
P = 0.3
# (B, H, H_kv, T, D): GQA and MHA; T not a multiple of the interpreter's blocks in one
FLASH_SHAPES = [(2, 8, 2, 256, 64), (1, 4, 4, 200, 64)] if GPU else [(2, 4, 2, 32, 16), (1, 2, 2, 24, 32)]
NORM_SHAPES = [(4, 256, 384), (3, 5, 1000)] if GPU else [(2, 8, 40), (3, 5, 64)]


def one_config_each(monkeypatch) -> None:
    """The flash kernels tune over their first config only (forgetting earlier picks), the add + norm kernels take
    their default config: every new (dtype, causal, dropout, T) then compiles 2 kernels, not the whole tuning set."""
    monkeypatch.setattr(fa, "_TUNED", {})
    for name in dir(fa):  # every autotuner of the flash kernels (_attn_fwd_tuned, _attn_bwd_tuned, ...)
        tuner = getattr(fa, name)
        if name.endswith("_tuned") and isinstance(getattr(tuner, "configs", None), list):
            monkeypatch.setattr(tuner, "configs", tuner.configs[:1])
    monkeypatch.setattr(fan, "AUTOTUNE", False)


@pytest.fixture(autouse=True)
def _one_config_each_on_gpu(monkeypatch):
    if GPU:
        one_config_each(monkeypatch)


def _flash_inputs(B, H, H_kv, T, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_()
    return make(B, H, T, D), make(B, H_kv, T, D), make(B, H_kv, T, D)


def _seed(value: int, device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


def _grads(out: torch.Tensor, inputs, dout: torch.Tensor):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("dropout_p", [0.0, P])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_ops_pass_opcheck(causal, dropout_p, device):
    q, k, v = _flash_inputs(1, 4, 2, 32, 16, torch.float32, device)
    seed = _seed(11, device) if dropout_p else None
    torch.library.opcheck(torch.ops.tinylm.flash_attention_fwd, (q, k, v, seed, causal, 0.25, dropout_p))
    with torch.no_grad():
        o, lse = torch.ops.tinylm.flash_attention_fwd(q, k, v, seed, causal, 0.25, dropout_p)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, seed, causal, 0.25, dropout_p)
    torch.library.opcheck(torch.ops.tinylm.flash_attention_bwd, args)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", FLASH_SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}D{}".format(*s))
def test_flash_op_with_dropout_matches_reference_with_its_mask(shape, causal, device, assert_close):
    """The op's seed tensor gives the keep mask of dropout_keep_mask(int(seed)), in the forward and the backward."""
    dtype = torch.bfloat16 if GPU else torch.float32
    q, k, v = _flash_inputs(*shape, dtype, device)
    do = torch.randn_like(q)
    seed = _seed(123457, device)
    out = compile_ops.flash_attention(q, k, v, causal=causal, dropout_p=P, seed=seed)
    fast = (out, *_grads(out, (q, k, v), do))
    B, H, _, T, _ = shape
    keep = fa.dropout_keep_mask(123457, B, H, T, P, device)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = fa.reference(q32, k32, v32, causal, dropout_p=P, keep=keep)
    ref = (want, *_grads(want, (q32, k32, v32), do.float()))
    for name, got, expected in zip(("o", "dq", "dk", "dv"), fast, ref):
        assert_close(got, expected, scale=1.0 if name == "o" else 2.0)


def test_flash_op_without_dropout_matches_reference(device, assert_close):
    q, k, v = _flash_inputs(2, 4, 2, 40, 32, torch.float32, device, seed=3)
    do = torch.randn_like(q)
    out = compile_ops.flash_attention(q, k, v, causal=True)
    want = fa.reference(q, k, v, causal=True)
    for got, expected in zip((out, *_grads(out, (q, k, v), do)), (want, *_grads(want, (q, k, v), do))):
        assert_close(got, expected)


def test_flash_op_seed_decides_the_mask(device):
    q, k, v = _flash_inputs(1, 2, 2, 32, 16, torch.float32, device)
    run = lambda s: compile_ops.flash_attention(q, k, v, dropout_p=P, seed=_seed(s, device))
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


def test_flash_op_draws_its_seed_from_torch_generator(device):
    q, k, v = _flash_inputs(1, 2, 2, 32, 16, torch.float32, device)
    torch.manual_seed(9)
    drawn = compile_ops.flash_attention(q, k, v, dropout_p=P)
    torch.manual_seed(9)
    seed = compile_ops.draw_seed(device)
    assert torch.equal(drawn, compile_ops.flash_attention(q, k, v, dropout_p=P, seed=seed))


def _seed_tensor_specs() -> list[tuple]:
    """sm90_compile_test's builds of the attention kernels with dropout, the seed a pointer to int64 (the op's)."""
    return [
        (f"{name} seed tensor", kernel, {**sig, "seed": "*i64"}, const, warps, stages)
        for name, kernel, sig, const, warps, stages in sm90._specs()
        if name.startswith("attn") and const.get("DROPOUT")
    ]


def _build_all() -> None:
    """Subprocess entry of sm90.build_in_subprocess."""
    sm90._build_all(_seed_tensor_specs())


@pytest.mark.skipif(
    GPU or not sm90._nvidia_backend_available(), reason="a GPU runs the kernels; this triton has no NVIDIA backend"
)
def test_flash_kernels_with_a_seed_tensor_compile_for_sm90():
    """The interpreter is lenient about types: the compiled kernels must take the seed as a pointer too."""
    sm90.build_in_subprocess("kernels.compile_ops_test", len(_seed_tensor_specs()))


def test_flash_op_refuses_bad_inputs(device):
    q, k, v = _flash_inputs(1, 2, 2, 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match="head dims"):
        compile_ops.flash_attention(q[..., :8], k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="dropout_p"):
        compile_ops.flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="scale"):
        compile_ops.flash_attention(q, k, v, scale=-1.0)


def _norm_inputs(shape, x_dtype, res_dtype, bias: bool, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *s, dtype: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_()
    C = shape[-1]
    x, residual = make(*shape, dtype=x_dtype), make(*shape, dtype=res_dtype)
    weight = (1 + 0.3 * torch.randn(C, generator=g, device=device)).requires_grad_()
    b = make(C, dtype=torch.float32) if bias else None
    return x, residual, weight, b


@pytest.mark.parametrize("kind", ["layer", "layer-nobias", "rms"])
def test_add_norm_ops_pass_opcheck(kind, device):
    x, residual, weight, bias = _norm_inputs((2, 8, 40), torch.float32, torch.float32, kind == "layer", device)
    is_rms = kind == "rms"
    torch.library.opcheck(torch.ops.tinylm.add_norm_fwd, (x, residual, weight, bias, 1e-5, is_rms))
    with torch.no_grad():
        y, s, mean, rstd = torch.ops.tinylm.add_norm_fwd(x, residual, weight, bias, 1e-5, is_rms)
    for dres in (torch.randn_like(s), None):
        bias_in = bias.detach() if bias is not None else None  # the backward op has no backward of its own
        args = (torch.randn_like(y), dres, s, weight.detach(), bias_in, mean, rstd, is_rms, torch.float32)
        torch.library.opcheck(torch.ops.tinylm.add_norm_bwd, args)


@pytest.mark.parametrize("kind", ["layer", "layer-nobias", "rms"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_norm_op_matches_reference(shape, kind, device, assert_close):
    """Both outputs used downstream (the new residual flows on, as in every block but the last)."""
    x, residual, weight, bias = _norm_inputs(shape, torch.float32, torch.float32, kind == "layer", device)
    is_rms = kind == "rms"
    op = compile_ops.add_rms_norm if is_rms else compile_ops.add_layer_norm
    args = (x, residual, weight) if is_rms else (x, residual, weight, bias)
    dy, dres = torch.randn_like(x), torch.randn_like(x)
    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    y, s = op(*args)
    got = (y, s, *_grads((y * dy).sum() + (s * dres).sum(), leaves, None))
    y, s = fan.reference(x, residual, weight, bias, 1e-6 if is_rms else 1e-5, is_rms)
    want = (y, s, *_grads((y * dy).sum() + (s * dres).sum(), leaves, None))
    for got_t, want_t in zip(got, want):
        assert_close(got_t, want_t)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: bf16 sublayer outputs on an fp32 residual stream")
def test_gpu_add_norm_op_mixed_dtypes_only_normed_output_used():
    """As the trainer runs it under autocast: x bf16, the residual fp32; the last block's new residual is unused."""
    x, residual, weight, bias = _norm_inputs((8, 256, 384), torch.bfloat16, torch.float32, True, "cuda")
    dy = torch.randn_like(x)
    y, s = compile_ops.add_layer_norm(x, residual, weight, bias)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    got = (y, *_grads((y.float() * dy.float()).sum(), (x, residual, weight, bias), None))
    y, _ = fan.reference(x, residual, weight, bias, 1e-5, False)
    want = (y, *_grads((y.float() * dy.float()).sum(), (x, residual, weight, bias), None))
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t.float(), want_t.float(), atol=3e-2, rtol=3e-2)


def test_add_norm_op_refuses_bad_inputs(device):
    x, residual, weight, _ = _norm_inputs((2, 3, 16), torch.float32, torch.float32, False, device)
    with pytest.raises(ValueError, match="residual must have"):
        compile_ops.add_rms_norm(x, residual[:, :2], weight)
    with pytest.raises(ValueError, match="weight must be"):
        compile_ops.add_rms_norm(x, residual, weight[:8])
    wide = torch.zeros(1, fan.MAX_FUSED_COLS + 1, device=device)
    with pytest.raises(ValueError, match="columns"):
        compile_ops.add_rms_norm(wide, wide, torch.ones(fan.MAX_FUSED_COLS + 1, device=device))


def _attention_and_norm(q, k, v, x, residual, weight, bias, seed):
    """A little of a block: attention (with dropout from `seed`), then the residual add + LayerNorm of its output."""
    o = compile_ops.flash_attention(q, k, v, dropout_p=P, seed=seed)  # (B, H, T, D)
    B, H, T, D = o.shape
    return compile_ops.add_layer_norm(o.transpose(1, 2).reshape(B, T, H * D), residual, weight, bias)


def test_compiled_with_fullgraph_matches_eager(device):
    """aot_eager (AOTAutograd's forward and backward graphs, run eagerly): one graph, the same values and gradients."""
    q, k, v = _flash_inputs(1, 2, 2, 32, 16, torch.float32, device)
    _, residual, weight, bias = _norm_inputs((1, 32, 32), torch.float32, torch.float32, True, device)
    inputs = (q, k, v, None, residual, weight, bias, _seed(77, device))
    leaves = (q, k, v, residual, weight, bias)
    counts = torch._dynamo.explain(_attention_and_norm)(*inputs)
    assert counts.graph_count == 1 and counts.graph_break_count == 0, counts.break_reasons
    compiled = torch.compile(_attention_and_norm, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (_attention_and_norm, compiled):
        y, s = fn(*inputs)
        results.append((y, s, *_grads(y.square().sum() + s.sum(), leaves, None)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: torch.compile's CUDA graphs (reduce-overhead)")
def test_gpu_cuda_graph_replays_draw_a_fresh_mask_each():
    """Compiled with mode="reduce-overhead", the seed drawn in the graph is new at every replay, and each replay's
    output and gradients are the reference's with that replay's mask (the op read the seed on the device)."""
    B, H, H_kv, T, D = 4, 6, 6, 256, 64
    q, k, v = _flash_inputs(B, H, H_kv, T, D, torch.bfloat16, "cuda")

    def step(q, k, v):
        seed = compile_ops.draw_seed(q.device)
        o = compile_ops.flash_attention(q, k, v, dropout_p=P, seed=seed)
        return o, seed.clone()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    do = torch.randn_like(q)
    seeds = []
    for _ in range(5):  # warm-up, recording, then replays
        o, seed = compiled(q, k, v)
        grads = _grads(o, (q, k, v), do)
        seeds.append(int(seed))
        keep = fa.dropout_keep_mask(seeds[-1], B, H, T, P, "cuda")
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        want = fa.reference(q32, k32, v32, True, dropout_p=P, keep=keep)
        want_grads = _grads(want, (q32, k32, v32), do.float())
        for got, expected in zip((o, *grads), (want, *want_grads)):
            torch.testing.assert_close(got.float(), expected.float(), atol=6e-2, rtol=6e-2)
    assert len(set(seeds)) == len(seeds), f"a replay reused a seed: {seeds}"
