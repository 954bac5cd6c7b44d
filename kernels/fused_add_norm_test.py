"""Fused residual add + RMSNorm / LayerNorm (Triton) against the PyTorch reference, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_add_norm as fan
from kernels.fused_add_norm import add_layer_norm, add_rms_norm, layer_norm, reference, rms_norm

GPU = torch.cuda.is_available()
# (rows, C): C below, at and above a power of two; rows not a multiple of the row block.
# On CPU, (300, 24) gives the backward programs several row tiles each (rows_per_program > INTERPRET_BLOCK_ROWS).
SHAPES = (
    [(16384, 384), (4096, 1024), (1000, 384), (257, 4096), (3, 50)]
    if GPU
    else [(37, 48), (5, 64), (2, 3, 20), (300, 24)]
)
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if GPU else [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """One default config per width on the GPU: the many shapes and dtypes here would each compile the whole tuning
    set. The autotuned launch has its own test below."""
    monkeypatch.setattr(fan, "AUTOTUNE", False)


def _rand(shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_()


def _run(fn, x, residual, weight, bias, eps, is_rms, dnorm, dres):
    """Forward, then backward of <normed, dnorm> + <new_residual, dres>; returns outputs and input grads."""
    normed, new_res = fn(x, residual, weight, bias, eps, is_rms)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    grads = torch.autograd.grad([normed, new_res], inputs, [dnorm, dres])
    return (normed, new_res, *grads)


def _fast(x, residual, weight, bias, eps, is_rms):
    if is_rms:
        return add_rms_norm(x, residual, weight, eps, impl="triton")
    return add_layer_norm(x, residual, weight, bias, eps, impl="triton")


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_norm_matches_reference(shape, dtype, is_rms, device, assert_close):
    gen = torch.Generator(device=device).manual_seed(0)
    x, residual = _rand(shape, dtype, device, gen), _rand(shape, dtype, device, gen)
    weight = _rand(shape[-1:], dtype, device, gen)
    bias = None if is_rms else _rand(shape[-1:], dtype, device, gen)
    dnorm = torch.randn(*shape, generator=gen, device=device).to(dtype)
    dres = torch.randn(*shape, generator=gen, device=device).to(dtype)
    fast = _run(_fast, x, residual, weight, bias, 1e-5, is_rms, dnorm, dres)
    ref = _run(reference, x, residual, weight, bias, 1e-5, is_rms, dnorm, dres)
    assert fast[0].dtype == dtype and fast[1].dtype == dtype
    if dtype == torch.bfloat16 and device == "cpu":  # Triton 3.7's interpreter truncates fp32 -> bf16
        assert_close(fast[1], ref[1])
    else:  # the add is rounded as eager rounds it
        torch.testing.assert_close(fast[1], ref[1], atol=0, rtol=0)
    # weight/bias grads sum over every row: their error grows with the row count
    scales = [1.0, 1.0, 1.0, 1.0] + [4.0, 4.0]
    for got, want, scale in zip(fast, ref, scales):
        assert got.shape == want.shape
        assert_close(got, want, scale=scale)


def test_fp32_residual_stream_with_bf16_activations(device, assert_close):
    gen = torch.Generator(device=device).manual_seed(1)
    x = _rand((9, 32), torch.bfloat16, device, gen)
    residual = _rand((9, 32), torch.float32, device, gen)
    weight = _rand((32,), torch.float32, device, gen)
    normed, new_res = add_rms_norm(x, residual, weight, impl="triton")
    ref_normed, ref_res = reference(x, residual, weight, None, 1e-6, True)
    assert normed.dtype == torch.bfloat16 and new_res.dtype == torch.float32
    torch.testing.assert_close(new_res, ref_res)
    assert_close(normed, ref_normed)
    dres = torch.randn(9, 32, device=device)
    gx, gr = torch.autograd.grad([normed, new_res], [x, residual], [torch.randn_like(normed), dres])
    assert gx.dtype == torch.bfloat16 and gr.dtype == torch.float32
    torch.testing.assert_close(gx.float(), gr, atol=1e-2, rtol=1e-2)  # x and residual get one gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_norms_match_torch(dtype, device, assert_close):
    gen = torch.Generator(device=device).manual_seed(2)
    x = _rand((3, 7, 40), dtype, device, gen)
    w, b = _rand((40,), dtype, device, gen), _rand((40,), dtype, device, gen)
    dy = torch.randn(3, 7, 40, generator=gen, device=device).to(dtype)
    cases = [
        (rms_norm(x, w, 1e-6, impl="triton"), F.rms_norm(x.float(), (40,), w.float(), 1e-6), [x, w]),
        (
            layer_norm(x, w, b, 1e-5, impl="triton"),
            F.layer_norm(x.float(), (40,), w.float(), b.float(), 1e-5),
            [x, w, b],
        ),
    ]
    for out, want, inputs in cases:
        assert out.shape == x.shape and out.dtype == dtype
        assert_close(out, want)
        got_grads = torch.autograd.grad(out, inputs, dy)
        want_grads = torch.autograd.grad(want, inputs, dy.float())
        for g, wg in zip(got_grads, want_grads):
            assert_close(g, wg, scale=4.0)


def test_strided_input_and_auto_fallback_on_cpu():
    # CPU tensors either way: this checks the fallback choice and strided inputs to the kernel
    x = torch.randn(6, 2 * 32)[:, ::2]  # non-unit column stride
    res = torch.randn(6, 32)
    w = torch.randn(32)
    want = reference(x, res, w, None, 1e-6, True)
    if not torch.cuda.is_available():  # the interpreter takes CPU tensors
        got = add_rms_norm(x, res, w, impl="triton")
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    # "auto" on CPU tensors is the reference itself
    auto = add_rms_norm(x, res, w)
    torch.testing.assert_close(auto[0], want[0], atol=0, rtol=0)


def test_bad_shapes_are_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, x, torch.randn(7))
    with pytest.raises(ValueError, match="residual must"):
        add_rms_norm(x, torch.randn(4, 9), torch.randn(8))
    with pytest.raises(ValueError, match="bias must be"):
        add_layer_norm(x, x, torch.randn(8), torch.randn(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: training shapes on the real kernels")
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("n_rows,n_cols", [(64 * 256, 384), (4 * 1024, 768)])
def test_gpu_training_shapes_forward_and_backward(is_rms, n_rows, n_cols):
    """The shapes the trainer runs (shakespeare-char 64x256 rows of 384; gpt2 rows of 768), fp32 residual stream
    as under autocast: many row blocks, so the persistent backward sums many dweight partials."""
    torch.manual_seed(n_cols)
    x = torch.randn(n_rows, n_cols, device="cuda", requires_grad=True)
    weight = (1 + 0.1 * torch.randn(n_cols, device="cuda")).requires_grad_()
    bias = None if is_rms else (0.1 * torch.randn(n_cols, device="cuda")).requires_grad_()
    dy = torch.randn(n_rows, n_cols, device="cuda")
    y = rms_norm(x, weight, 1e-5) if is_rms else layer_norm(x, weight, bias, 1e-5)
    ref_y, _ = reference(x.double(), None, weight.double(), None if bias is None else bias.double(), 1e-5, is_rms)
    params = [x, weight] + ([] if bias is None else [bias])
    grads = torch.autograd.grad(y, params, dy)
    ref_grads = torch.autograd.grad(ref_y, params, dy.double())
    assert (y.double() - ref_y).norm() / ref_y.norm() < 1e-5
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 1e-4, f"{name} differs by {rel:.2e} relative"


@pytest.mark.parametrize("block_c", [16, 64, 512, 1024, 4096])
def test_autotune_configs_fit_the_row_width(block_c):
    """Every width gets configs to try; they stay within the spill-free limits measured with ptxas for sm_90 and keep
    every thread busy (but for rows so narrow that the largest tile cannot), and the backward's tiles divide its rows
    per program."""
    for configs, max_tile, max_per_thread in (
        (fan.FWD_CONFIGS, fan.FWD_MAX_TILE, fan.FWD_MAX_PER_THREAD),
        (fan.BWD_CONFIGS, fan.BWD_MAX_TILE, fan.BWD_MAX_PER_THREAD),
    ):
        kept = fan.configs_for(configs, block_c)
        assert kept
        for c in kept:
            rows = c.kwargs["BLOCK_ROWS"]
            assert rows * block_c <= max(max_tile, block_c)
            narrowest = len(kept) == 1 and rows == max(k.kwargs["BLOCK_ROWS"] for k in configs)
            assert narrowest or rows * block_c // (32 * c.num_warps) >= fan.MIN_ELEMS_PER_THREAD
            if configs is fan.BWD_CONFIGS:
                assert fan.BWD_ROW_QUANTUM % rows == 0


@pytest.mark.parametrize("block_c", [16, 64, 512, 1024, 4096])
def test_default_config_is_one_the_autotuner_would_try(block_c):
    for configs in (fan.FWD_CONFIGS, fan.BWD_CONFIGS):
        assert fan.default_config(configs, block_c) in fan.configs_for(configs, block_c)


@pytest.mark.parametrize("n_rows", [1, 15, 16, 17, 1000, 16384, 65536])
def test_backward_programs_cover_every_row_once(n_rows):
    per_program = fan._bwd_rows_per_program(n_rows, torch.device("cpu"))
    programs = -(-n_rows // per_program)
    assert per_program % fan.BWD_ROW_QUANTUM == 0
    assert (programs - 1) * per_program < n_rows <= programs * per_program


@pytest.mark.parametrize("used", ["normed", "new_residual"])
def test_backward_when_one_output_is_unused(used, device, assert_close):
    """The model's last block leaves its new residual unused (norm_f reads it); autograd then hands the backward
    None for that output's gradient, which must count as zero."""
    gen = torch.Generator(device=device).manual_seed(5)
    x, residual = _rand((11, 40), torch.float32, device, gen), _rand((11, 40), torch.float32, device, gen)
    weight, bias = _rand((40,), torch.float32, device, gen), _rand((40,), torch.float32, device, gen)
    dout = torch.randn(11, 40, generator=gen, device=device)
    grads = []
    for fn in (_fast, reference):
        normed, new_res = fn(x, residual, weight, bias, 1e-5, False)
        out = normed if used == "normed" else new_res
        grads.append(torch.autograd.grad(out, (x, residual, weight, bias), dout, allow_unused=True))
    for got, want in zip(*grads):
        if want is None:  # the reference's weight/bias take no gradient through the new residual
            assert got is None or not got.any()
        else:
            assert_close(got, want, scale=4.0)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the autotuned launch and its cached config")
def test_second_call_takes_the_cached_config_and_agrees(monkeypatch):
    monkeypatch.setattr(fan, "AUTOTUNE", True)
    torch.manual_seed(3)
    x, residual = (torch.randn(16384, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    weight = torch.randn(384, device="cuda", requires_grad=True)
    dnorm = torch.randn(16384, 384, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):  # the first call autotunes, the second launches the chosen config directly
        normed, new_res = add_rms_norm(x, residual, weight)
        runs.append((normed, new_res, *torch.autograd.grad([normed, new_res], [x, residual, weight], [dnorm, dnorm])))
    assert any(key[0] is fan._add_norm_fwd for key in fan._TUNED) and any(
        key[0] is fan._add_norm_bwd for key in fan._TUNED
    )
    for first, second in zip(*runs):
        torch.testing.assert_close(first, second, atol=0, rtol=0)


def _grads_of(fn, x, residual, weight, bias, is_rms, gen):
    """Forward and the backward of a fixed random <outputs, gradients> through fn (the fast path or reference)."""
    shape = x.shape
    dnorm = torch.randn(*shape, generator=gen, device=x.device).to(x.dtype)
    dres = torch.randn(*shape, generator=gen, device=x.device).to(residual.dtype)
    return _run(fn, x, residual, weight, bias, 1e-5, is_rms, dnorm, dres)


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("programs_per_sm", fan.BWD_PROGRAMS_PER_SM)
def test_backward_partials_at_an_odd_row_count_and_width_384(is_rms, programs_per_sm, monkeypatch, device):
    """C = 384 (a padded 512-column tile), rows not a multiple of any tile or run of rows, and every programs-per-SM
    setting: several programs, each with several tiles (its prefetched ones past its last row load nothing), and more
    dweight partials than _sum_partials takes in one step on CPU."""
    monkeypatch.setattr(fan, "DEFAULT_PROGRAMS_PER_SM", programs_per_sm)
    n_rows = 301 if device == "cpu" else 4099
    n_partials = -(-n_rows // fan._bwd_rows_per_program(n_rows, torch.device(device), programs_per_sm))
    # more partials than one _sum_partials step (on an H100/H200, 132 SMs, 4099 rows make 257 > 256 too)
    assert device != "cpu" or n_partials > fan.INTERPRET_SUM_BLOCK_P
    gen = torch.Generator(device=device).manual_seed(6)
    x, residual = _rand((n_rows, 384), torch.float32, device, gen), _rand((n_rows, 384), torch.float32, device, gen)
    weight = _rand((384,), torch.float32, device, gen)
    bias = None if is_rms else _rand((384,), torch.float32, device, gen)
    fast = _grads_of(_fast, x, residual, weight, bias, is_rms, gen.manual_seed(7))
    ref = _grads_of(reference, x, residual, weight, bias, is_rms, gen.manual_seed(7))
    tol = 1e-4 if device == "cpu" else 2e-3  # fp32 throughout on CPU; TF32-free but reordered sums on the GPU
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_fp32_residual_stream_backward_matches_reference(is_rms, device, assert_close):
    """bf16 activations on an fp32 residual stream (autocast training): x's gradient is written in bf16 by the kernel
    beside the fp32 one the residual gets; every output and gradient against the fp32 reference."""
    gen = torch.Generator(device=device).manual_seed(8)
    x = _rand((45, 96), torch.bfloat16, device, gen)
    residual = _rand((45, 96), torch.float32, device, gen)
    weight = _rand((96,), torch.float32, device, gen)
    bias = None if is_rms else _rand((96,), torch.float32, device, gen)
    fast = _grads_of(_fast, x, residual, weight, bias, is_rms, gen.manual_seed(9))
    ref = _grads_of(reference, x, residual, weight, bias, is_rms, gen.manual_seed(9))
    assert [t.dtype for t in fast] == [t.dtype for t in ref]
    assert fast[2].dtype == torch.bfloat16 and fast[3].dtype == torch.float32  # dx, dresidual
    torch.testing.assert_close(fast[1], ref[1], atol=0, rtol=0)  # the new residual
    for got, want in zip(fast, ref):
        assert_close(got, want, scale=4.0)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_sums", [1, 2])
def test_sum_partials_matches_torch_sum(n_sums, out_dtype, device, assert_close):
    """dweight (and dbias) = the column sums of the programs' partials, written in the parameter's dtype; more
    partial rows and columns than one block of either, neither a multiple of it."""
    gen = torch.Generator(device=device).manual_seed(10)
    interpret = device == "cpu"
    block_p = fan.INTERPRET_SUM_BLOCK_P if interpret else fan.SUM_BLOCK_P
    block_cols = fan.INTERPRET_SUM_BLOCK_COLS if interpret else fan.SUM_BLOCK_COLS
    n_partials, n_cols = 2 * block_p + 3, 2 * block_cols + 5
    partial = torch.randn(n_partials, n_sums, n_cols, generator=gen, device=device)
    dw = torch.empty(n_cols, dtype=out_dtype, device=device)
    db = torch.empty(n_cols, dtype=out_dtype, device=device) if n_sums == 2 else None
    grid = (-(-n_cols // block_cols), n_sums)
    fan._sum_partials[grid](
        partial, dw, db, n_partials, n_cols, HAS_BIAS=n_sums == 2, BLOCK_P=block_p, BLOCK_COLS=block_cols
    )
    want = partial.sum(0)
    for k, got in enumerate([dw, db][:n_sums]):
        assert got.dtype == out_dtype
        assert_close(got, want[k], scale=4.0)


def test_every_backward_candidate_computes_the_same_gradients(device, assert_close):
    """Each config the tuner may pick at C = 384 (tile, warps, programs per SM), launched as the tuned path launches
    it (the GPU's _sum_partials blocks too), against the reference's gradients. On the GPU: bf16 rows, fp32 weight,
    as the autotuned test below has them (the same compiled kernels)."""
    gen = torch.Generator(device=device).manual_seed(11)
    n_rows, dtype = (67, torch.float32) if device == "cpu" else (4096, torch.bfloat16)
    s, dy, dres = torch.randn(3, n_rows, 384, generator=gen, device=device).to(dtype)
    weight, bias = torch.randn(2, 384, generator=gen, device=device)
    for is_rms in (True, False):
        s_ref = s.float().requires_grad_()
        w_ref, b_ref = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        normed, _ = reference(s_ref, None, w_ref, None if is_rms else b_ref, 1e-5, is_rms)
        want_ds, *want_params = torch.autograd.grad(normed, [s_ref, w_ref] + ([] if is_rms else [b_ref]), dy.float())
        _, _, mean, rstd = fan._forward(s, None, weight, None if is_rms else bias, 1e-5, is_rms)
        n_sums = 1 if is_rms else 2
        for config in fan.configs_for(fan.BWD_CONFIGS, 512):
            ds, dw, db = torch.empty_like(s), torch.empty_like(weight), torch.empty_like(bias)
            partial = torch.empty(n_rows, n_sums, 384, device=device)  # room for any number of programs
            meta = dict(IS_RMS=is_rms, HAS_DRES=True, HAS_BIAS=not is_rms, HAS_DX=False, BLOCK_C=512)
            fan._launch_backward(
                config, partial, dw, None if is_rms else db, (dy, dres, s, weight, mean, rstd, ds, ds), meta
            )
            assert_close(ds, want_ds + dres.float())
            for got, want in zip([dw, db], want_params):
                torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=lambda m: f"{config}: {m}")


def test_backward_tuner_takes_the_fastest_candidate_once(monkeypatch):
    """The tuner times every candidate with the partial sum included (here a stand-in clock that also checks the
    scratch partials have room for the candidate), keeps the fastest per key, and never tunes inside a capture or
    when AUTOTUNE is off."""
    monkeypatch.setattr(fan, "AUTOTUNE", True)
    monkeypatch.setattr(fan, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    capturing = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: bool(capturing))
    candidates = fan.configs_for(fan.BWD_CONFIGS, 512)
    fastest = candidates[len(candidates) // 2]
    timed = []

    def run(config, partial):
        per_program = fan._bwd_rows_per_program(16384, torch.device("cpu"), config.kwargs["PROGRAMS_PER_SM"])
        assert partial.shape[0] >= -(-16384 // per_program)
        timed.append(config)

    clock = lambda fn: (fn(), 1.0 if timed[-1] is fastest else 2.0)[1]
    monkeypatch.setattr(fan, "_graph_ms", clock)
    scratch = lambda: torch.empty(16384 // fan.BWD_ROW_QUANTUM, 1, 8)
    capturing.append(True)
    assert fan._backward_config("key", 512, run, scratch) == fan.default_config(fan.BWD_CONFIGS, 512)
    assert not timed and "key" not in fan._TUNED
    capturing.clear()
    assert fan._backward_config("key", 512, run, scratch) is fastest
    assert timed == candidates and fan._TUNED["key"] is fastest
    assert fan._backward_config("key", 512, run, scratch) is fastest and len(timed) == len(candidates)
    monkeypatch.setattr(fan, "AUTOTUNE", False)
    assert fan._backward_config("other", 512, run, scratch) == fan.default_config(fan.BWD_CONFIGS, 512)
    assert len(timed) == len(candidates)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: CUDA-graph capture and replay")
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_gpu_forward_and_backward_replayed_in_a_cuda_graph(is_rms):
    """As the compiled trainer runs it: fwd+bwd captured in a CUDA graph (after a warm-up call), replayed on new
    inputs copied into the captured ones, gives what an eager call gives on those inputs."""
    torch.manual_seed(12)
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x, residual, weight, bias = make(16384, 384), make(16384, 384), make(384), make(384)
    bias = None if is_rms else bias
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    grads = [torch.randn(16384, 384, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def step():
        return _run(_fast, x, residual, weight, bias, 1e-5, is_rms, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    with torch.no_grad():
        for t in inputs + grads:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
