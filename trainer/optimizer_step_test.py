"""The compiled clip + optimizer step (trainer.optimizer_step) and regional compilation (compile_scope=blocks), on a
CPU: each must train to the losses of the eager loop, compile once (no recompilation as the learning rate changes,
one block graph for every layer) and resume exactly. torch.compile runs with the aot_eager backend (dynamo's tracing
and AOT autograd as on a GPU, without Inductor's minute-long C++ builds); one test runs Inductor itself."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from trainer.config import ConfigError, load_config
from trainer.optimizer_step import CompiledOptimizerStep, prepare_optimizer, set_lr
from trainer.testing import fast_config
from trainer.train import build_model, make_optimizer, train

_REAL_COMPILE = torch.compile


@pytest.fixture()
def counted_compile(monkeypatch):
    """torch.compile on the aot_eager backend, counting the graphs dynamo compiles (from an empty dynamo cache)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def compile_with_counter(fn=None, *, mode=None, **kwargs):  # mode picks Inductor's options: no meaning here
        return _REAL_COMPILE(fn, backend=counter, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_counter)
    yield counter
    torch._dynamo.reset()


def _model_and_optimizer(optimizer: str, seed: int = 0):
    config = fast_config(optimizer=optimizer, lr=3e-3, muon_lr=0.02)
    torch.manual_seed(seed)
    model = build_model(config, vocab_size=32)
    opt = make_optimizer(model, config, torch.device("cpu"))
    if optimizer == "muon":
        opt.optimizers[1].ns_dtype = torch.float32  # bf16's Newton-Schulz amplifies last-bit differences: test exactly
    prepare_optimizer(opt, torch.device("cpu"))
    return model, opt


def _steps(model, opt, step_fn, steps: int = 5) -> list[float]:
    """`steps` steps on fresh random gradients, the lr following a warmup; the norms step_fn returned."""
    gen = torch.Generator().manual_seed(1)
    norms = []
    for k in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * (0.1 + k)
        set_lr(opt, (k + 1) / steps)
        norms.append(float(step_fn()))
        opt.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_compiled_step_matches_the_eager_step_and_compiles_once(counted_compile, optimizer):
    eager_model, eager_opt = _model_and_optimizer(optimizer)
    params = list(eager_model.parameters())

    def eager_step():
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        eager_opt.step()
        return norm

    expected = _steps(eager_model, eager_opt, eager_step)
    model, opt = _model_and_optimizer(optimizer)
    compiled = CompiledOptimizerStep(list(model.parameters()), opt, 1.0, torch.compile)
    got = _steps(model, opt, compiled.step)
    assert got == pytest.approx(expected, rel=1e-6)
    for (name, a), b in zip(eager_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(params, _model_and_optimizer(optimizer)[0].parameters()))
    # the clip, AdamW's step (torch.optim breaks the graph around it on purpose) and Muon's step: each compiled once,
    # whatever the learning rate (a float lr would be a constant in the graph and recompile at every change)
    assert counted_compile.frame_count == (3 if optimizer == "muon" else 2)


def test_compiled_step_with_inductor_matches_the_eager_step():
    """Inductor's own lowering of clip + AdamW (its C++ backend on a CPU; Triton on a GPU)."""
    torch._dynamo.reset()
    eager_model, eager_opt = _model_and_optimizer("adamw")
    params = list(eager_model.parameters())

    def eager_step():
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        eager_opt.step()
        return norm

    expected = _steps(eager_model, eager_opt, eager_step, steps=3)
    model, opt = _model_and_optimizer("adamw")
    compiled = CompiledOptimizerStep(list(model.parameters()), opt, 0.5, _REAL_COMPILE)
    assert _steps(model, opt, compiled.step, steps=3) == pytest.approx(expected, rel=1e-5)
    for a, b in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def _run(config, corpus, tmp_path, name, **kwargs):
    return train(config, corpus, store_root=tmp_path / "store", run_dir=tmp_path / name, data_dir=tmp_path / "data",
                 **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        dict(compile_optimizer=True),  # eager model, compiled clip + step
        dict(compile_mode="default", compile_scope="blocks"),
        dict(compile_mode="default", compile_scope="blocks", compile_optimizer=True),
    ],
    ids=["optimizer", "blocks", "blocks+optimizer"],
)
def test_compiled_options_train_to_the_losses_of_the_eager_loop(counted_compile, small_corpus, tmp_path, changes):
    config = fast_config(dropout=0.1, max_steps=20, eval_interval=10)
    eager = _run(config, small_corpus, tmp_path, "eager")
    assert counted_compile.frame_count == 0
    got = _run(config.replace(**changes), small_corpus, tmp_path, "compiled")
    assert got.losses == pytest.approx(eager.losses, rel=1e-5)  # 20 steps with dropout: the RNG stream is the same
    assert got.grad_norms == pytest.approx(eager.grad_norms, rel=1e-3)
    assert got.metrics["val_loss"] == pytest.approx(eager.metrics["val_loss"], rel=1e-5)
    blocks = 2 if changes.get("compile_scope") == "blocks" else 0  # one graph per mode (train, eval) for all 4 blocks
    optimizer = 2 if changes.get("compile_optimizer") else 0  # clip, AdamW step
    assert counted_compile.frame_count == blocks + optimizer


def test_muon_compiled_step_trains_like_the_eager_one(counted_compile, small_corpus, tmp_path):
    """Muon's Newton-Schulz runs in bfloat16, where the last-bit difference of a float32 tensor lr grows over steps:
    the same training within bf16 noise (the exact comparison is the float32 unit test above)."""
    config = fast_config(optimizer="muon", max_steps=20, eval_interval=10)
    eager = _run(config, small_corpus, tmp_path, "eager")
    got = _run(config.replace(compile_optimizer=True), small_corpus, tmp_path, "compiled")
    assert got.losses == pytest.approx(eager.losses, abs=5e-3)
    assert counted_compile.frame_count == 3


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_with_the_compiled_step_is_exact(counted_compile, small_corpus, tmp_path, optimizer):
    config = fast_config(dropout=0.1, resume=True, optimizer=optimizer, compile_optimizer=True)
    full = _run(config, small_corpus, tmp_path, "full")
    calls = []
    first = _run(config, small_corpus, tmp_path, "cut", should_stop=lambda: calls.append(1) or len(calls) > 6)
    assert first.stopped == "cancelled" and first.steps == 6
    second = _run(config, small_corpus, tmp_path, "cut")
    assert second.steps == 12
    assert first.losses + second.losses == full.losses  # bit for bit
    assert first.grad_norms + second.grad_norms == full.grad_norms


def test_a_worker_process_compiles_the_step_of_every_run(counted_compile, small_corpus, tmp_path):
    """Dynamo's entries for torch.optim's step guard on the optimizer's identity and share one code object: without
    `release` at the end of a run, the fifth run in a process (with Muon: AdamW's and Muon's step each) hit the
    recompile limit (8) and stepped eagerly from then on."""
    config = fast_config(max_steps=2, eval_interval=2, optimizer="muon", compile_optimizer=True)
    compiled = []
    for i in range(6):
        before = counted_compile.frame_count
        _run(config, small_corpus, tmp_path, f"run{i}")
        compiled.append(counted_compile.frame_count - before)
    assert compiled == [3] + [2] * 5  # the clip's graph (shapes guarded, not identity) is kept for the later runs


def test_prepare_optimizer_keeps_values_and_makes_lr_a_tensor():
    model, opt = _model_and_optimizer("muon")
    assert all(isinstance(g["lr"], torch.Tensor) and g["lr"].dim() == 0 for g in opt.param_groups)
    set_lr(opt, 0.5)
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([g["base_lr"] * 0.5 for g in opt.param_groups])
    adamw = opt.optimizers[0].param_groups
    assert all(g["fused"] is False and g["foreach"] is False and g["capturable"] is False for g in adamw)  # a CPU
    muon_state = [opt.optimizers[1].state[p] for p in opt.optimizers[1].param_groups[0]["params"]]
    assert muon_state and all("momentum_buffer" in state for state in muon_state)
    # CUDA-graph trees may replay a graph that writes into these only when dynamo knows their address is static
    static = [s["momentum_buffer"] for s in muon_state] + [g["lr"] for g in opt.param_groups]
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in static)


def test_config_validates_the_new_options():
    with pytest.raises(ConfigError, match=r"compile_scope must be one of .*'model', 'blocks'") as err:
        load_config("tiny", overrides={"compile_scope": "layers"})
    assert err.value.key == "compile_scope"
    with pytest.raises(ConfigError, match="compile_optimizer must be true or false") as err:
        load_config("tiny", overrides={"compile_optimizer": "maybe"})
    with pytest.raises(ConfigError, match="compile_optimizer must be false with step_graph=true"):
        fast_config(compile_optimizer=True, step_graph=True)
    with pytest.raises(ConfigError, match="got float16") as err:
        fast_config(compile_optimizer=True, dtype="float16")
    assert err.value.key == "compile_optimizer"
    config = load_config(
        "shakespeare-char", overrides={"compile_scope": "blocks", "compile_optimizer": "yes", "step_graph": "false"}
    )
    assert config.compile_scope == "blocks" and config.compile_optimizer is True
    assert load_config("shakespeare-char").compile_scope == "model"
    assert not load_config("shakespeare-char").compile_optimizer


def test_blocks_scope_compiles_each_block_in_place(monkeypatch, small_corpus, dirs):
    """compile_scope=blocks hands every Block (and nothing else) to torch.compile with the run's mode."""
    calls = []

    def fake_compile(fn=None, *, mode=None, **kwargs):
        calls.append((getattr(fn, "__self__", fn).__class__.__name__, mode))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    train(fast_config(max_steps=1, compile_mode="reduce-overhead", compile_scope="blocks"), small_corpus, **dirs)
    assert calls == [("Block", "reduce-overhead")] * 4


def test_a_step_that_fails_to_compile_runs_eagerly(caplog):
    """A backend failure (torch 2.11's Inductor on Muon's step, on the H200) does not end the run: the step runs
    eagerly from then on, with a warning, and trains exactly as the eager step does."""
    calls = []

    def failing_compile(fn):
        def compiled():
            calls.append(1)
            failed = torch._dynamo.exc.BackendCompilerFailed
            err = failed.__new__(failed)  # its constructor's arguments differ between torch versions
            Exception.__init__(err, "inductor said no")
            raise err

        return compiled

    model, opt = _model_and_optimizer("muon")
    ref_model, ref_opt = _model_and_optimizer("muon")
    step = CompiledOptimizerStep(list(model.parameters()), opt, 1.0, failing_compile)
    eager = CompiledOptimizerStep(list(ref_model.parameters()), ref_opt, 1.0, lambda fn: fn)
    with caplog.at_level("WARNING", logger="trainer.optimizer_step"):
        assert _steps(model, opt, step.step) == _steps(ref_model, ref_opt, eager.step)
    assert len(calls) == 1 and "runs eagerly" in caplog.text
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
