"""Flash attention (Triton, forward and backward) against the PyTorch reference on fresh random inputs, with and
without attention dropout (exactly against the kernel's own keep mask, and statistically)."""

import contextlib
import math

import pytest
import torch
import triton

from kernels import flash_attention as fa
from kernels.flash_attention import dropout_keep_mask, flash_attention, reference

GPU = torch.cuda.is_available()
# (B, H, H_kv, T, D): GQA, MHA and MQA; T not a multiple of the blocks in some, to cover the bounds masks.
SHAPES = (
    [(2, 8, 2, 256, 64), (1, 4, 4, 200, 32), (1, 4, 1, 333, 128), (2, 6, 6, 1024, 64)]
    if GPU
    else [(2, 4, 2, 32, 32), (1, 2, 2, 24, 16), (1, 4, 1, 40, 32)]
)
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]  # fp16: its own test below
# Dropout against the kernel's own mask: GQA and MHA, T a multiple of the blocks and not.
DROPOUT_SHAPES = [(2, 8, 2, 256, 64), (1, 4, 4, 200, 64)] if GPU else [(2, 4, 2, 32, 32), (1, 2, 2, 24, 16)]
P = 0.3
# valid at every head dim (the backward's D=128 pruning keeps blocks <= 64)
GPU_TEST_FWD_CONFIG = next(c for c in fa.FWD_CONFIGS if c.kwargs == {"BLOCK_M": 64, "BLOCK_N": 64})
GPU_TEST_BWD_CONFIG, GPU_TEST_BWD_ATOMIC_CONFIG = (
    next(c for c in configs if (c.kwargs["BLOCK_BIG"], c.kwargs["BLOCK_SMALL"]) == (64, 32))
    for configs in (fa.BWD_CONFIGS, fa.BWD_ATOMIC_CONFIGS)
)
EVERY_CONFIG_SEED = 5
GRAD_TOL_SCALE = 2.0  # gradients go through two more low-precision matmuls than the output


@pytest.fixture(autouse=True)
def _one_config_each_on_gpu(request, monkeypatch):
    """On a GPU, the tests other than test_gpu_every_config_* (which run each config at the training variant) tune
    over one config per kernel: each dtype / head dim / causal / ragged-T variant compiles 3 kernels, not all 18
    (minutes of compiling); the tuner's other picks are checked by those tests. Their backward adds dQ by atomics
    (by its own programs under deterministic algorithms) without timing both ways first, but in the tests that say
    otherwise (those that test the timing, those that run each way)."""
    if GPU and "every_config" not in request.node.name:
        monkeypatch.setattr(fa, "_TUNED", {})  # and forget the picks made from the whole set, then from this one
        monkeypatch.setattr(fa, "_DQ_ATOMIC", {})
        if "dq_strateg" in request.node.name:  # the strategy's own tests: its real pick; timing on but in the default's
            if "by_default" not in request.node.name:
                monkeypatch.setattr(fa, "DQ_ATOMIC_TIMING", True)
        else:
            monkeypatch.setattr(
                fa, "_pick_dq_atomic", lambda key, run: not torch.are_deterministic_algorithms_enabled()
            )
        monkeypatch.setattr(fa._attn_fwd_tuned, "configs", [GPU_TEST_FWD_CONFIG])
        monkeypatch.setattr(fa._attn_bwd_tuned, "configs", [GPU_TEST_BWD_CONFIG])
        monkeypatch.setattr(fa._attn_bwd_atomic_tuned, "configs", [GPU_TEST_BWD_ATOMIC_CONFIG])


@contextlib.contextmanager
def _deterministic():
    """Deterministic algorithms on: the backward then never adds dQ by atomics (whose order, and so the last bits
    of dQ, vary from run to run on a GPU), so two runs can be compared bit for bit."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _inputs(B, H, H_kv, T, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_()
    return make(B, H, T, D), make(B, H_kv, T, D), make(B, H_kv, T, D)


def _fwd_bwd(fn, q, k, v, do, **kw):
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, causal, dtype, device, assert_close):
    q, k, v = _inputs(*shape, dtype, device)
    do = torch.randn_like(q)
    fast = _fwd_bwd(flash_attention, q, k, v, do, causal=causal, impl="triton")
    # The reference runs in fp32 on fp32 copies: the truth the low-precision kernel is compared with.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _fwd_bwd(reference, q32, k32, v32, do.float(), causal=causal)
    assert fast[0].dtype == dtype and fast[0].shape == q.shape
    assert_close(fast[0], ref[0])
    for got, want in zip(fast[1:], ref[1:]):
        assert got.shape == want.shape
        assert_close(got, want, scale=GRAD_TOL_SCALE)


def test_fp16_through_interpreter_or_gpu(device, assert_close):
    q, k, v = _inputs(1, 4, 2, 32, 32, torch.float16, device, seed=1)
    do = torch.randn_like(q)
    fast = _fwd_bwd(flash_attention, q, k, v, do, impl="triton")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _fwd_bwd(reference, q32, k32, v32, do.float())
    for got, want in zip(fast, ref):
        assert_close(got, want, scale=GRAD_TOL_SCALE)


def test_strided_views_of_a_fused_qkv(device, assert_close):
    """q, k, v sliced out of one (B, T, 3, H, D) projection: strided, not contiguous; grads reach the parent."""
    B, T, H, D = 2, 24, 4, 32
    qkv = torch.randn(B, T, 3, H, D, device=device, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, impl="triton")
    do = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, do)
    out_ref = reference(q, k, v)
    (grad_ref,) = torch.autograd.grad(out_ref, qkv, do)
    assert_close(out, out_ref)
    assert_close(grad, grad_ref, scale=GRAD_TOL_SCALE)


def test_explicit_scale_and_default_scale(device, assert_close):
    q, k, v = _inputs(1, 2, 2, 16, 16, torch.float32, device, seed=2)
    with torch.no_grad():
        default = flash_attention(q, k, v, impl="triton")
        explicit = flash_attention(q, k, v, scale=1.0 / math.sqrt(16), impl="triton")
        other = flash_attention(q, k, v, scale=0.5, impl="triton")
        assert_close(other, reference(q, k, v, scale=0.5))
    torch.testing.assert_close(default, explicit)
    assert (other - default).abs().max() > 1e-3  # the scale is not ignored


def test_auto_on_cpu_is_the_reference():
    q, k, v = _inputs(1, 2, 1, 8, 16, torch.float32, "cpu", seed=3)
    torch.testing.assert_close(flash_attention(q, k, v), reference(q, k, v), atol=0, rtol=0)
    # Unsupported head dims fall back under "auto" and are refused when Triton is forced.
    q, k, v = _inputs(1, 2, 1, 8, 24, torch.float32, "cpu", seed=3)
    torch.testing.assert_close(flash_attention(q, k, v), reference(q, k, v), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not support"):
        flash_attention(q, k, v, impl="triton")


def test_bad_inputs_are_refused():
    q, k, v = _inputs(1, 6, 4, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="must divide"):
        flash_attention(q, k, v)
    q, k, v = _inputs(1, 4, 2, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl"):
        flash_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="T=8"):
        flash_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="scale must be > 0"):
        flash_attention(q, k, v, scale=-1.0)


def _force_dq_strategy(monkeypatch, atomic: bool) -> None:
    monkeypatch.setattr(fa, "_pick_dq_atomic", lambda key, run: atomic)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the trainer's and the bench's shapes in bf16")
@pytest.mark.parametrize("atomic", [False, True], ids=["dq_own_programs", "dq_atomic"])
@pytest.mark.parametrize("b,h,hkv,t", [(64, 6, 6, 256), (8, 6, 6, 256), (4, 12, 4, 1024), (1, 6, 6, 200)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_real_shapes_bf16_forward_and_backward(b, h, hkv, t, causal, atomic, monkeypatch):
    """Real shapes (shakespeare-char's 6 heads at T 256, GQA at T 1024, a ragged T) against the fp32 reference,
    dQ by either way."""
    _force_dq_strategy(monkeypatch, atomic)
    torch.manual_seed(t + b)
    q = torch.randn(b, h, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(b, h, t, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # the eval path (no autograd graph) first
        out_eval = flash_attention(q, k, v, causal=causal)
    out = flash_attention(q, k, v, causal=causal)
    ref = reference(q.float(), k.float(), v.float(), causal=causal)
    for name, got in (("eval out", out_eval), ("out", out)):
        rel = (got.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, f"{name} differs by {rel:.2e} relative"
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    for name, got, want in zip("qkv", grads, ref_grads):
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 2e-2, f"d{name} differs by {rel:.2e} relative"


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the model's strided q, k, v at training shapes")
@pytest.mark.parametrize("t", [256, 1024])
def test_gpu_transposed_views_as_the_model_passes_them(t):
    """The model hands attention (B, T, H, D) projections transposed to (B, H, T, D): T stride H*D, not D."""
    torch.manual_seed(t)
    b, h, d = 8, 6, 64
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    assert q.stride(2) == h * d
    out = flash_attention(q, k, v, causal=True)
    ref = reference(q.float(), k.float(), v.float(), causal=True)
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Dropout


def _reference_with_kernel_mask(q, k, v, do, causal, p, seed):
    """fp32 reference output and gradients with the keep mask the kernel uses for `seed`."""
    keep = dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], p, q.device)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    return _fwd_bwd(reference, q32, k32, v32, do.float(), causal=causal, dropout_p=p, keep=keep), keep


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}D{}".format(*s))
def test_dropout_matches_reference_with_the_same_mask(shape, causal, device, assert_close):
    """Output and dq, dk, dv equal the reference's (and its autograd's) under the kernel's keep mask: the forward,
    the dK/dV programs and the dQ programs all draw the mask the debug kernel draws, at three different tilings."""
    dtype = torch.bfloat16 if GPU else torch.float32
    q, k, v = _inputs(*shape, dtype, device, seed=4)
    do = torch.randn_like(q)
    fast = _fwd_bwd(flash_attention, q, k, v, do, causal=causal, dropout_p=P, seed=1234, impl="triton")
    ref, keep = _reference_with_kernel_mask(q, k, v, do, causal, P, 1234)
    assert 0.6 < keep.float().mean() < 0.8  # a mask that drops about P (the statistical test below is the tight one)
    assert_close(fast[0], ref[0])
    for got, want in zip(fast[1:], ref[1:]):
        assert_close(got, want, scale=GRAD_TOL_SCALE)
    # and the mask matters: without dropout the same inputs give another output
    plain = reference(q.detach().float(), k.detach().float(), v.detach().float(), causal=causal)
    assert (fast[0].float() - plain).abs().max() > 0.1


def test_dropout_zero_is_exactly_no_dropout(device):
    q, k, v = _inputs(1, 4, 2, 32, 32, torch.float32, device, seed=5)
    do = torch.randn_like(q)
    with _deterministic():
        plain = _fwd_bwd(flash_attention, q, k, v, do, impl="triton")
        zero = _fwd_bwd(flash_attention, q, k, v, do, dropout_p=0.0, seed=99, impl="triton")
    for a, b in zip(plain, zero):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_keep_fraction_and_independence_are_those_of_bernoulli(device):
    """Over 2 * 4 * 96 * 96 = 73,728 draws per p, the kept fraction is 1 - p within 4 standard errors, overall and
    in each of the eight 16-bit lanes of a Philox call (key % 8: low and high half of each word), heads are
    independent (not one mask repeated), and so are neighbouring keys (the fraction kept of kept pairs is again
    1 - p; pairs within a word and across words alike)."""
    B, H, T = 2, 4, 96
    for p in (0.1, 0.2, 0.5):
        keep = dropout_keep_mask(7, B, H, T, p, device).float()
        n = keep.numel()
        se = math.sqrt(p * (1 - p) / n)
        assert abs(keep.mean().item() - (1 - p)) < 4 * se, (p, keep.mean().item())
        for lane in range(8):
            part = keep[..., lane::8]
            assert abs(part.mean().item() - (1 - p)) < 4 * se * math.sqrt(8), (p, lane, part.mean().item())
        same = (keep[:, 0] == keep[:, 1]).float().mean().item()  # two heads agree as often as independent draws
        agree = p * p + (1 - p) * (1 - p)
        assert abs(same - agree) < 4 * math.sqrt(agree * (1 - agree) / (n / H)), (p, same)
        pairs = keep[..., :-1] * keep[..., 1:]
        assert abs(pairs.sum().item() / keep[..., :-1].sum().item() - (1 - p)) < 5 * se * 2, p


def test_dropout_threshold_is_p_to_16_bits_and_the_scale_unbiased():
    """The keep test's 16-bit threshold: P(drop) within 2**-17 of p, and keep_scale * P(keep) == 1 exactly (so
    E[output] is the undropped attention), from tiny p to p near 1."""
    for p in (1e-4, 0.1, 0.2, 0.3, 0.5, 0.9, 0.99999):
        _, threshold, keep_scale = fa._dropout_args(p, 0)
        assert 0 <= threshold < 2**16
        assert abs(threshold / 2**16 - p) <= 2**-17 + 1e-12, p
        assert math.isclose(keep_scale * (2**16 - threshold) / 2**16, 1.0, rel_tol=1e-12), p


def test_dropout_mean_over_masks_is_the_undropped_output(device):
    """E[dropout attention] = attention: averaged over 2 seeds x 64 heads (independent masks for the same q, k, v),
    the output lands on the no-dropout output within 5 standard errors of that mean, element by element; the same
    test tells a kernel that forgot the 1 / (1 - p) apart."""
    heads, seeds, T, D, p = 64, 2, 16, 16, 0.2
    g = torch.Generator(device=device).manual_seed(6)
    q1, k1, v1 = (torch.randn(1, 1, T, D, generator=g, device=device) for _ in range(3))
    q, k, v = (t.expand(1, heads, T, D) for t in (q1, k1, v1))
    with torch.no_grad():
        outs = torch.cat([flash_attention(q, k, v, dropout_p=p, seed=s, impl="triton")[0] for s in range(seeds)])
        want = flash_attention(q1, k1, v1, impl="triton")[0, 0]
    mean, sem = outs.mean(0), outs.std(0) / math.sqrt(heads * seeds)  # (T, D)
    assert (sem > 0).all()
    assert ((mean - want) / sem).abs().max() < 5
    assert ((mean - (1 - p) * want) / sem).abs().max() > 5  # what an unscaled dropout would give is rejected
    assert ((outs[0] - want).abs() > 1e-3).any()  # each sample is dropped, only the mean matches


def test_same_seed_same_output_other_seed_other_output(device):
    q, k, v = _inputs(1, 2, 1, 32, 16, torch.float32, device, seed=8)
    do = torch.randn_like(q)
    with _deterministic():
        a = _fwd_bwd(flash_attention, q, k, v, do, dropout_p=P, seed=11, impl="triton")
        b = _fwd_bwd(flash_attention, q, k, v, do, dropout_p=P, seed=11, impl="triton")
        c = _fwd_bwd(flash_attention, q, k, v, do, dropout_p=P, seed=12, impl="triton")
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
        assert (x - z).abs().max() > 1e-3


def test_seed_comes_from_torch_generator(device):
    """Without an explicit seed, torch.manual_seed makes a dropout call repeat; the next call draws another mask."""
    q, k, v = _inputs(1, 2, 2, 16, 16, torch.float32, device, seed=9)
    with torch.no_grad():
        torch.manual_seed(3)
        first, second = (flash_attention(q, k, v, dropout_p=P, impl="triton") for _ in range(2))
        torch.manual_seed(3)
        again = flash_attention(q, k, v, dropout_p=P, impl="triton")
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - second).abs().max() > 1e-3


def test_bad_dropout_is_refused():
    q, k, v = _inputs(1, 2, 2, 8, 16, torch.float32, "cpu")
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            flash_attention(q, k, v, dropout_p=p)
    with pytest.raises(ValueError, match=f"T <= {fa.MAX_DROPOUT_T}"):
        dropout_keep_mask(0, 1, 1, fa.MAX_DROPOUT_T + 1, 0.1, "cpu")


def test_reference_fallback_drops_with_torch():
    """impl="reference" (CPU training) applies torch's dropout: some outputs change, and p=0 changes none."""
    q, k, v = _inputs(1, 2, 2, 16, 16, torch.float32, "cpu", seed=10)
    with torch.no_grad():
        plain = flash_attention(q, k, v, impl="reference")
        torch.manual_seed(0)
        dropped = flash_attention(q, k, v, dropout_p=P, impl="reference")
    assert (plain - dropped).abs().max() > 1e-3


def test_autotune_pruning_keeps_configs_that_fit():
    """The pruning of the GPU autotuner (not run on CPU otherwise): blocks no larger than the padded T, the
    backward's blocks at D=128 no larger than 64, and never an empty list."""
    prune_bwd = fa._prune("BLOCK_BIG", fa.BWD_MAX_BLOCK_D128)
    kept = prune_bwd(fa.BWD_CONFIGS, {"T_BUCKET": 1024}, HEAD_DIM=64)
    assert kept == fa.BWD_CONFIGS
    kept = prune_bwd(fa.BWD_CONFIGS, {"T_BUCKET": 1024}, HEAD_DIM=128)
    assert kept and all(c.kwargs["BLOCK_BIG"] <= 64 for c in kept) and len(kept) < len(fa.BWD_CONFIGS)
    kept = prune_bwd(fa.BWD_CONFIGS, {"T_BUCKET": 16}, HEAD_DIM=64)
    assert kept and all(c.kwargs["BLOCK_BIG"] <= 32 for c in kept)
    kept = fa._prune("BLOCK_M")(fa.FWD_CONFIGS, {"T_BUCKET": 16}, HEAD_DIM=64)
    assert len(kept) == 1  # no forward config is that small: the smallest is kept


@pytest.mark.skipif(GPU, reason="the interpreter's take on every config; on a GPU test_gpu_every_config_* run them")
@pytest.mark.parametrize("T", [128, 80])
def test_every_config_block_shape_in_the_interpreter(T, assert_close):
    """Each autotune config's block sizes (warps and stages mean nothing to the interpreter), dQ by atomics and by
    its own programs, give the reference's output and gradients with dropout and GQA, at a T that fills the largest
    blocks and one that does not."""
    q, k, v = _inputs(1, 2, 1, T, 16, torch.float32, "cpu", seed=13)
    do = torch.randn_like(q)
    (ref, *ref_grads), _ = _reference_with_kernel_mask(q, k, v, do, True, P, 3)
    q, k, v, scale = q.detach(), k.detach(), v.detach(), 1 / math.sqrt(16)
    for cfg in {str(c.kwargs): c for c in fa.FWD_CONFIGS}.values():
        assert_close(fa._forward(q, k, v, True, scale, P, 3, config=cfg)[0], ref)
    o, lse = fa._forward(q, k, v, True, scale, P, 3)
    for cfg in {str(c.kwargs): c for c in fa.BWD_CONFIGS + fa.BWD_ATOMIC_CONFIGS}.values():
        for got, want in zip(fa._backward(do, q, k, v, o, lse, True, scale, P, 3, config=cfg), ref_grads):
            assert_close(got, want, scale=GRAD_TOL_SCALE)


@pytest.mark.skipif(GPU, reason="16 more compiles on a GPU, where the real-shape and every-config tests run each way")
@pytest.mark.parametrize("atomic", [False, True], ids=["dq_own_programs", "dq_atomic"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, P])
@pytest.mark.parametrize("shape", [(2, 4, 2, 40, 16), (1, 2, 2, 128, 32)], ids=["GQA_T40", "MHA_T128"])
def test_backward_each_dq_strategy_matches_reference(shape, dropout_p, causal, atomic, device, assert_close):
    """dQ by atomics (preprocess, key programs adding dS K, cast) and by its own programs, each forced through a
    config, against the reference's autograd: GQA at a ragged T and MHA at a T that fills the blocks, causal or not,
    with and without dropout (the kernel's own mask)."""
    q, k, v = _inputs(*shape, torch.float32, device, seed=14)
    do = torch.randn_like(q)
    if dropout_p > 0.0:
        (ref, *ref_grads), _ = _reference_with_kernel_mask(q, k, v, do, causal, dropout_p, 21)
    else:
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref, *ref_grads = _fwd_bwd(reference, q32, k32, v32, do, causal=causal)
    q, k, v, scale = q.detach(), k.detach(), v.detach(), 1 / math.sqrt(shape[-1])
    o, lse = fa._forward(q, k, v, causal, scale, dropout_p, 21)
    assert_close(o, ref)
    cfg = GPU_TEST_BWD_ATOMIC_CONFIG if atomic else GPU_TEST_BWD_CONFIG
    grads = fa._backward(do, q, k, v, o, lse, causal, scale, dropout_p, 21, config=cfg)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, scale=GRAD_TOL_SCALE)


@pytest.mark.skipif(GPU, reason="the GPU tests' B64 H6 shapes have 384 rows: many full groups and a short one")
@pytest.mark.parametrize("atomic", [False, True], ids=["dq_own_programs", "dq_atomic"])
def test_more_rows_than_a_program_group(atomic, assert_close):
    """24 heads (48 rows of backward programs without atomics): `_tile`'s order over more than ROW_GROUP rows, a full
    group and a short one, reaches every (row, block) once, forward and backward, causal with dropout."""
    assert fa.ROW_GROUP < 24 < 2 * fa.ROW_GROUP
    q, k, v = _inputs(2, 12, 12, 80, 16, torch.float32, "cpu", seed=17)
    do = torch.randn_like(q)
    (ref, *ref_grads), _ = _reference_with_kernel_mask(q, k, v, do, True, P, 5)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = fa._forward(q, k, v, True, 0.25, P, 5)
    assert_close(o, ref)
    cfg = GPU_TEST_BWD_ATOMIC_CONFIG if atomic else GPU_TEST_BWD_CONFIG
    for got, want in zip(fa._backward(do, q, k, v, o, lse, True, 0.25, P, 5, config=cfg), ref_grads):
        assert_close(got, want, scale=GRAD_TOL_SCALE)


def test_preprocess_writes_delta_and_zeroes_the_dq_accumulator(device):
    """The atomic backward's preprocess: delta = rowsum(dO * O) per row, and the accumulator (here full of NaN, as
    reused memory may be) all zeros, at a T that is not a multiple of its block (rows past T untouched)."""
    B, H, T, D, block = 2, 3, 40, 32, 32
    g = torch.Generator(device=device).manual_seed(15)
    o, do = (torch.randn(B, H, T, D, generator=g, device=device) for _ in range(2))
    delta = torch.full((B * H * T + 1,), float("nan"), device=device)
    acc = torch.full((B, H, T, D), float("nan"), device=device)
    fa._bwd_preprocess[(B * H, triton.cdiv(T, block))](o, do, delta, acc, T, HEAD_DIM=D, EVEN_T=False, BLOCK=block)
    torch.testing.assert_close(delta[:-1].view(B, H, T), (o * do).sum(-1), atol=1e-5, rtol=1e-5)
    assert delta[-1].isnan()
    assert (acc == 0).all()


def test_dq_strategy_is_own_programs_under_deterministic_algorithms(monkeypatch):
    """With deterministic algorithms asked for, no atomics (and no timing run); otherwise a decided key is reused."""
    runs = []
    monkeypatch.setattr(fa, "DQ_ATOMIC_TIMING", True)
    monkeypatch.setattr(fa, "_DQ_ATOMIC", {("decided",): True})
    with _deterministic():
        assert fa._pick_dq_atomic(("decided",), runs.append) is False
        assert fa._pick_dq_atomic(("new",), runs.append) is False
    assert fa._pick_dq_atomic(("decided",), runs.append) is True
    assert runs == []


def test_dq_strategy_is_own_programs_without_timing_by_default(monkeypatch):
    """DQ_ATOMIC_TIMING off (the default: atomics lost at every training key on the H200): no timing run, no
    decision recorded, its own programs, whatever an earlier timing decided."""
    assert fa.DQ_ATOMIC_TIMING is False
    monkeypatch.setattr(fa, "_DQ_ATOMIC", {("decided",): True})
    runs = []
    assert fa._pick_dq_atomic(("new",), runs.append) is False
    assert fa._pick_dq_atomic(("decided",), runs.append) is False
    assert runs == [] and ("new",) not in fa._DQ_ATOMIC


def test_dq_strategy_timing_falls_back_to_plain_launches_where_a_graph_fails(monkeypatch):
    """Where capturing the CUDA graph raises (say, inside another tool's graph memory pool), the strategy timing
    takes plain launches instead of failing the backward."""

    def capture_fails(fn, rep):
        raise RuntimeError("operation not permitted when stream is capturing")

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", capture_fails)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: (fn(), 1.5)[1])
    assert fa._graph_ms(lambda: calls.append("run")) == 1.5
    assert calls == ["run"]


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: times both backward strategies in a CUDA graph")
def test_gpu_backward_times_both_dq_strategies_once_per_key():
    """The first backward of a key times both strategies (through CUDA graphs) and records the faster; both give
    the reference's gradients there; a second call reuses the decision."""
    q, k, v = _inputs(4, 6, 6, 256, 64, torch.bfloat16, "cuda", seed=16)
    do = torch.randn_like(q)
    _fwd_bwd(flash_attention, q, k, v, do, causal=True)
    key = (256, torch.bfloat16, 64, True, False)
    assert key in fa._DQ_ATOMIC
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    _, *ref_grads = _fwd_bwd(reference, q32, k32, v32, do.float(), causal=True)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = fa._forward(q, k, v, True, 1 / 8, 0.0, 0)
    for atomic in (False, True):
        for name, got, want in zip("qkv", fa._backward_by(atomic, do, q, k, v, o, lse, True, 1 / 8, 0.0, 0), ref_grads):
            rel = (got.float() - want).norm() / want.norm()
            assert rel < 2e-2, f"d{name} (atomic={atomic}) differs by {rel:.2e} relative"
    assert fa._pick_dq_atomic(key, lambda atomic: pytest.fail("timed again")) == fa._DQ_ATOMIC[key]


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the training shapes with dropout in bf16")
@pytest.mark.parametrize("atomic", [False, True], ids=["dq_own_programs", "dq_atomic"])
@pytest.mark.parametrize("b,h,hkv,t", [(64, 6, 6, 256), (4, 12, 4, 1024), (2, 6, 6, 200)])
def test_gpu_dropout_real_shapes_bf16(b, h, hkv, t, atomic, monkeypatch):
    """Training shapes with p = 0.2 (the preset's) against the fp32 reference under the kernel's own mask, dQ by
    either way."""
    _force_dq_strategy(monkeypatch, atomic)
    q, k, v = _inputs(b, h, hkv, t, 64, torch.bfloat16, "cuda", seed=t)
    do = torch.randn_like(q)
    out, *grads = _fwd_bwd(flash_attention, q, k, v, do, causal=True, dropout_p=0.2, seed=77)
    (ref, *ref_grads), _ = _reference_with_kernel_mask(q, k, v, do, True, 0.2, 77)
    for name, got, want, tol in [("out", out, ref, 1e-2), *zip(("dq", "dk", "dv"), grads, ref_grads, [2e-2] * 3)]:
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < tol, f"{name} differs by {rel:.2e} relative"


def _every_config_case(dropout_p):
    """(q, k, v, do, reference out, reference grads) at the training variant (B8 H6 T256 D64, causal, bf16: the
    bench's, so the compiles are cached for it); the mask, when p > 0, is the kernel's for seed EVERY_CONFIG_SEED."""
    q, k, v = _inputs(8, 6, 6, 256, 64, torch.bfloat16, "cuda", seed=12)
    do = torch.randn_like(q)
    if dropout_p > 0.0:
        (ref, *ref_grads), _ = _reference_with_kernel_mask(q, k, v, do, True, dropout_p, EVERY_CONFIG_SEED)
    else:
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref, *ref_grads = _fwd_bwd(reference, q32, k32, v32, do.float(), causal=True)
    return q.detach(), k.detach(), v.detach(), do, ref, ref_grads


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: compiles every autotune config")
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("cfg", fa.FWD_CONFIGS, ids=str)
def test_gpu_every_config_forward(cfg, dropout_p):
    """The tuner keeps whichever config is fastest, so each forward config must be right."""
    q, k, v, _, ref, _ = _every_config_case(dropout_p)
    out, _ = fa._forward(q, k, v, True, 1 / math.sqrt(64), dropout_p, EVERY_CONFIG_SEED, config=cfg)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, f"out differs by {rel:.2e} relative"


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: compiles every autotune config")
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("cfg", fa.BWD_CONFIGS + fa.BWD_ATOMIC_CONFIGS, ids=str)
def test_gpu_every_config_backward(cfg, dropout_p):
    """Each backward config must be right too (O and the LSE from one fixed forward config, not tuned here)."""
    q, k, v, do, _, ref_grads = _every_config_case(dropout_p)
    scale = 1 / math.sqrt(64)
    o, lse = fa._forward(q, k, v, True, scale, dropout_p, EVERY_CONFIG_SEED, config=GPU_TEST_FWD_CONFIG)
    grads = fa._backward(do, q, k, v, o, lse, True, scale, dropout_p, EVERY_CONFIG_SEED, config=cfg)
    for name, got, want in zip("qkv", grads, ref_grads):
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 2e-2, f"d{name} differs by {rel:.2e} relative"
