import math

import pytest
import torch
from safetensors.torch import load_file

from trainer.testing import fast_config
from trainer.run_log import read_log
from trainer.train import artifact_copy, build_model, train


# muon: its momentum buffers and AdamW's state resume too; input noise: its draws are the uninterrupted run's
@pytest.mark.parametrize("optimizer,input_noise", [("adamw", 0.0), ("muon", 0.0), ("adamw", 0.2)])
def test_resume_reproduces_the_uninterrupted_run_exactly(small_corpus, tmp_path, optimizer, input_noise):
    cfg = fast_config(dropout=0.1, resume=True, optimizer=optimizer, input_noise=input_noise)  # dropout: RNG resumes
    full = train(cfg, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / "a", data_dir=tmp_path / "d")

    calls = []
    first = train(cfg, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / "b", data_dir=tmp_path / "d",
                  should_stop=lambda: calls.append(1) or len(calls) > 6)  # fmt: skip
    assert first.stopped == "cancelled" and first.steps == 6 and first.model_id is None
    second = train(cfg, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / "b", data_dir=tmp_path / "d")
    assert second.stopped == "completed" and second.steps == 12
    assert first.losses + second.losses == full.losses  # bit for bit
    assert first.grad_norms + second.grad_norms == full.grad_norms
    assert second.model_id == full.model_id  # content-addressed: the same best weights
    a, b = load_file(tmp_path / "a/resume/model.safetensors"), load_file(tmp_path / "b/resume/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r["step"]) for r in read_log(tmp_path / "b/log.csv") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_input_noise_changes_only_the_training_inputs(small_corpus, tmp_path):
    """A noised run trains on other inputs (its training loss differs from the plain run's at the first step), the
    same seed gives the same run, and evaluations are not noised: with a learning rate too small to move the weights,
    the plain and noised runs' val losses agree while their training losses do not."""
    dirs = {"store_root": tmp_path / "s", "data_dir": tmp_path / "d"}
    vals: dict[str, list[float]] = {}

    def run(tag: str, noise: float, lr: float):
        vals[tag] = []
        record = lambda s, m: "val_loss" in m and vals[tag].append(m["val_loss"])  # noqa: E731
        cfg = fast_config(eval_interval=4, input_noise=noise, lr=lr, min_lr=0.0)
        return train(cfg, small_corpus, run_dir=tmp_path / tag, progress_callback=record, **dirs)

    plain, noised, again = run("plain", 0.0, 1e-3), run("noised", 0.3, 1e-3), run("again", 0.3, 1e-3)
    assert noised.losses[0] != plain.losses[0] and noised.losses == again.losses
    still, still_noised = run("still", 0.0, 1e-12), run("still-noised", 0.3, 1e-12)
    assert still.losses[0] != still_noised.losses[0]
    assert vals["still"] == pytest.approx(vals["still-noised"], abs=1e-6) and len(vals["still"]) >= 2


def test_checkpoint_interval_saves_the_resume_state_only_at_its_steps(small_corpus, tmp_path):
    """checkpoint_interval=8 with an evaluation every 4 steps: the state on disk after 12 steps is step 8's, and a
    resumed run picks up there and retrains steps 9-12 to the same losses, bit for bit."""
    cfg = fast_config(dropout=0.1, resume=True, checkpoint_interval=8)
    dirs = dict(store_root=tmp_path / "s", run_dir=tmp_path / "a", data_dir=tmp_path / "d")
    full = train(cfg, small_corpus, **dirs)
    assert full.steps == 12
    again = train(cfg.replace(max_steps=12), small_corpus, **dirs)  # resumes from the last saved state
    assert again.steps == 12 and again.losses == full.losses[8:]


def test_checkpoint_interval_keeps_the_best_weights_on_the_device_until_the_loop_ends(small_corpus, tmp_path):
    """With checkpoint_interval past the run, no best weights reach the disk during it; a cancel at step 7 (best at the
    evaluation of step 6) writes step 6's weights, the file an every-evaluation run wrote at step 6."""
    files, seen_on_disk = {}, {}
    for every in (0, 100):
        run_dir, calls, seen = tmp_path / f"r{every}", [], seen_on_disk.setdefault(every, [])
        train(fast_config(dropout=0.1, eval_interval=2, checkpoint_interval=every), small_corpus,
              store_root=tmp_path / "s", run_dir=run_dir, data_dir=tmp_path / "d",
              should_stop=lambda: calls.append(1) or len(calls) > 7,
              progress_callback=lambda step, m, d=run_dir, seen=seen: "val_loss" in m
              and seen.append((d / "best" / "model.safetensors").is_file()))  # fmt: skip
        files[every] = load_file(run_dir / "best" / "model.safetensors")
        final = load_file(run_dir / "resume" / "model.safetensors")  # the cancelled run's state, step 7
    assert seen_on_disk == {0: [True, True, True], 100: [False, False, False]}  # (written before the callback)
    assert all(torch.equal(files[0][k], files[100][k]) for k in files[0])
    assert not all(torch.equal(files[100][k], final[k]) for k in final)  # step 6's weights, not step 7's


def test_cancel_stops_at_the_next_step_and_keeps_the_best_checkpoint(small_corpus, dirs):
    stop = []
    seen = []

    def on_progress(step, metrics):
        seen.append(step)
        if step == 5:
            stop.append(True)

    result = train(fast_config(), small_corpus, progress_callback=on_progress, should_stop=lambda: bool(stop), **dirs)
    assert result.stopped == "cancelled" and result.steps == 5 and result.model_id is None
    assert max(seen) == 5
    assert (dirs["run_dir"] / "best" / "model.safetensors").is_file()  # from the evaluation at step 4
    assert (dirs["run_dir"] / "resume" / "state.json").is_file()
    assert not dirs["store_root"].exists() or not any(dirs["store_root"].iterdir())


def test_early_stopping_when_val_loss_stops_improving(small_corpus, dirs):
    cfg = fast_config(lr=5.0, min_lr=0.0, warmup=0, grad_clip=0.0, max_steps=40, eval_interval=2,
                      early_stop_patience=2)  # fmt: skip
    result = train(cfg, small_corpus, **dirs)
    assert result.stopped == "early_stop" and result.steps < 40
    assert result.model_id is not None
    assert result.metrics["best_step"] <= result.steps - 4


def test_progress_metrics_and_reduced_precision(small_corpus, dirs):
    got = {}
    result = train(fast_config(dtype="bfloat16", max_steps=4), small_corpus,
                   progress_callback=got.__setitem__, **dirs)  # fmt: skip
    assert all(math.isfinite(x) for x in result.losses)
    assert {"loss", "lr", "grad_norm", "dropout", "tokens_per_s", "eta_s", "elapsed_s"} <= set(got[1])
    assert "mfu" not in got[1]  # no peak FLOPs known on a CPU
    assert {"val_loss", "train_loss", "val_ppl", "loss"} <= set(got[4])  # the eval call carries both
    assert got[4]["val_ppl"] == math.exp(got[4]["val_loss"])


def test_gradient_checkpointing_trains_the_same(small_corpus, tmp_path):
    cfg = fast_config(max_steps=4, eval_interval=4, dropout=0.0)
    runs = {}
    for on in (False, True):
        d = tmp_path / str(on)
        runs[on] = train(cfg.replace(grad_checkpointing=on), small_corpus, store_root=d / "s", run_dir=d / "r",
                         data_dir=tmp_path / "data")  # fmt: skip
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-6, abs=1e-7)
    assert runs[True].grad_norms == pytest.approx(runs[False].grad_norms, rel=1e-5)


@pytest.mark.parametrize("mode, expected", [
    ("default", {"mode": None}), ("reduce-overhead", {"mode": "reduce-overhead"}),
    ("max-autotune", {"mode": "max-autotune"}),
    ("reduce-overhead-tuned", {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}),
])  # fmt: skip
def test_compile_mode_reaches_torch_compile(small_corpus, dirs, monkeypatch, mode, expected):
    calls = []

    def fake_compile(model, **kwargs):  # records the call; runs eager (a real compile takes a minute on CPU)
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    train(fast_config(max_steps=1, compile_mode=mode), small_corpus, **dirs)
    assert calls == [expected]


def test_kernels_switch_scopes_the_whole_run(monkeypatch, tmp_path):
    """`kernels=false` turns model.layers' kernels off for the run (and only for it)."""
    from model import layers
    from trainer import train as train_module
    from trainer.config import load_config

    seen = []
    monkeypatch.setattr(train_module, "_train", lambda config, corpus, **kw: seen.append(layers._KERNELS_ON.get()))
    for on in (False, True):
        train_module.train(load_config("tiny").replace(kernels=on), tmp_path / "corpus.txt", store_root=tmp_path)
    assert seen == [False, True]
    assert layers._KERNELS_ON.get() is None  # back to each kernel's default (model/layers.KERNEL_DEFAULTS)


def test_reading_metrics_once_per_log_interval_changes_no_number(small_corpus, tmp_path):
    """The loop syncs with the device only at log points; per-step losses and norms, and what the callback and the
    run log see at a log point, are those of a loop that reads them every step."""
    runs, seen = {}, {}
    for interval in (1, 5):
        got = seen[interval] = {}
        runs[interval] = train(fast_config(dropout=0.1, log_interval=interval), small_corpus,
                               store_root=tmp_path / f"s{interval}", run_dir=tmp_path / f"r{interval}",
                               data_dir=tmp_path / "d", progress_callback=got.__setitem__)  # fmt: skip
    assert runs[5].losses == runs[1].losses and runs[5].grad_norms == runs[1].grad_norms
    assert len(runs[5].losses) == 12
    for step in (5, 10, 12):  # log points (and the last step), with the loss of that step
        assert seen[5][step]["loss"] == runs[1].losses[step - 1] == seen[1][step]["loss"]
    logged = [int(r["step"]) for r in read_log(tmp_path / "r5/log.csv") if r["kind"] == "train"]
    assert logged == [5, 10, 12]


def test_step_graph_is_refused_where_a_captured_step_cannot_run(small_corpus, dirs):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"step_graph=true needs: device must be a CUDA GPU, got cpu; "
                                          r"dropout_start must be unset") as err:  # fmt: skip
        train(fast_config(step_graph=True, dropout_start=0.2), small_corpus, **dirs)
    assert err.value.key == "step_graph"
    # the compiled model can be captured inside the step only where torch.compile records no CUDA graphs itself
    with pytest.raises(ConfigError, match=r"compile_mode must be one of none, default .*got reduce-overhead") as err:
        train(fast_config(step_graph=True, compile_mode="reduce-overhead"), small_corpus, **dirs)
    assert err.value.key == "step_graph"


def test_val_full_evaluation_scores_the_whole_val_split(small_corpus, dirs):
    """eval_mode=val-full: each evaluation's val loss is the model's loss on every token of the val split (what
    trainer.evaluate.split_loss gives the saved best weights); the training path and losses are those of a sampled
    run (the evaluation draws no random numbers the training uses)."""
    from safetensors.torch import load_model

    from trainer.data import prepare_data
    from trainer.evaluate import split_loss
    from trainer.train import build_model

    seen: dict[int, dict] = {}
    config = fast_config(eval_mode="val-full", dropout=0.1, max_steps=8, eval_interval=8)
    result = train(config, small_corpus, progress_callback=seen.__setitem__, **dirs)
    assert "val_loss" in seen[8] and "train_loss" in seen[8]
    data = prepare_data(small_corpus, config.tokenizer, dirs["data_dir"])
    model = build_model(config, data.vocab_size)
    load_model(model, str(dirs["run_dir"] / "best" / "model.safetensors"))  # saved at the one evaluation
    whole = split_loss(model, data.val, model.config.block_size, torch.device("cpu"))
    assert seen[8]["val_loss"] == pytest.approx(whole, rel=1e-6)
    sampled = train(config.replace(eval_mode="sampled"), small_corpus, store_root=dirs["store_root"],
                    run_dir=dirs["run_dir"].with_name("sampled"), data_dir=dirs["data_dir"])  # fmt: skip
    assert sampled.losses == result.losses


def test_an_unknown_eval_mode_is_named_with_the_allowed_ones():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval_mode must be one of \['sampled', 'val-full'\], got 'whole'") as err:
        fast_config(eval_mode="whole")
    assert err.value.key == "eval_mode"


def test_step_graph_auto_steps_without_the_capture_where_it_cannot_run(small_corpus, tmp_path, caplog):
    """step_graph=auto on a CPU: the run steps as step_graph=false does (same losses, bit for bit) and its log names
    what a capture would need."""
    import logging

    runs = {}
    with caplog.at_level(logging.INFO, logger="trainer.train"):
        for mode in (False, "auto"):
            runs[mode] = train(fast_config(dropout=0.1, step_graph=mode), small_corpus, store_root=tmp_path / "s",
                               run_dir=tmp_path / f"r{mode}", data_dir=tmp_path / "d")  # fmt: skip
    assert runs["auto"].losses == runs[False].losses and len(runs["auto"].losses) == 12
    assert (
        "step_graph=auto: the step is not captured (it would need: device must be a CUDA GPU, got cpu)" in caplog.text
    )


def test_the_weight_average_is_what_the_evaluation_and_the_best_checkpoint_see(small_corpus, tmp_path):
    """ema_decay=d, an evaluation after step 2 only: the best weights written are d^2 w0 + d(1-d) w1 + (1-d) w2, with
    w0 the initial weights and w1, w2 those after steps 1 and 2 of the same run without the average (which does not
    change the training: its losses are those of the run without it)."""
    from trainer.data import prepare_data
    from trainer.train import build_model

    d = 0.7
    base = fast_config(dropout=0.1, decay="constant", max_steps=2, eval_interval=2)
    runs, weights = {}, {}
    for name, config in (("w1", base.replace(max_steps=1, eval_interval=1)), ("w2", base),
                         ("ema", base.replace(ema_decay=d))):  # fmt: skip
        runs[name] = train(config, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / name,
                           data_dir=tmp_path / "d")  # fmt: skip
        weights[name] = load_file(tmp_path / name / "resume" / "model.safetensors")  # the training weights at the end
    assert runs["ema"].losses == runs["w2"].losses and runs["w1"].losses == runs["w2"].losses[:1]
    assert all(torch.equal(weights["ema"][k], weights["w2"][k]) for k in weights["w2"])  # trained alike
    torch.manual_seed(base.seed)  # as the trainer builds its model
    w0 = build_model(base, prepare_data(small_corpus, base.tokenizer, tmp_path / "d").vocab_size).state_dict()
    best = load_file(tmp_path / "ema" / "best" / "model.safetensors")
    for k, got in best.items():
        want = d * d * w0[k] + d * (1 - d) * weights["w1"][k] + (1 - d) * weights["w2"][k]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(best[k], weights["w2"][k]) for k in best)


def test_resume_with_a_weight_average_is_exact(small_corpus, tmp_path):
    cfg = fast_config(dropout=0.1, resume=True, ema_decay=0.8)
    full = train(cfg, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / "a", data_dir=tmp_path / "d")
    calls = []
    first = train(cfg, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / "b", data_dir=tmp_path / "d",
                  should_stop=lambda: calls.append(1) or len(calls) > 6)  # fmt: skip
    second = train(cfg, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / "b", data_dir=tmp_path / "d")
    assert first.losses + second.losses == full.losses
    a, b = load_file(tmp_path / "a/best/model.safetensors"), load_file(tmp_path / "b/best/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the average was saved and restored with the rest
    assert second.metrics["val_loss"] == full.metrics["val_loss"]


def test_the_artifact_is_saved_from_a_copy_and_the_live_model_keeps_its_parameters():
    """_publish saves `artifact_copy(model)`: a float32 CPU copy in eval mode. The live model's Parameter objects keep
    their storage, dtype and mode: compiled code a process keeps for its next run still holds them (on the H200 a
    model moved in place to the CPU crashed that next run; trainer/PERF_NOTES.md section 15)."""
    torch.manual_seed(0)
    model = build_model(fast_config(), 40).to(torch.bfloat16).train()  # .float() would swap every storage
    assert model.config.tie_weights
    live = [(p, p.data_ptr(), p.dtype) for p in model.parameters()]
    rng = torch.get_rng_state()
    copy = artifact_copy(model)
    assert [(p, p.data_ptr(), p.dtype) for p in model.parameters()] == live and model.training
    assert torch.equal(torch.get_rng_state(), rng)  # the copy's throwaway initialisation drew nothing
    assert not copy.training and copy.lm_head.weight is copy.tok_emb.weight  # tied as the model is
    got, want = copy.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert t.device.type == "cpu" and t.dtype == torch.float32, name
        assert torch.equal(t, want[name].float()), name
