import pytest

from trainer.config import TRAIN_PRESETS, ConfigError, TrainConfig, load_config, micro_batch_plan, parse_overrides
from model.presets import PRESETS


def test_every_model_preset_has_a_train_preset():
    assert set(PRESETS) <= set(TRAIN_PRESETS)
    for name, cfg in TRAIN_PRESETS.items():
        assert cfg.preset == name or (name not in PRESETS and cfg.preset in PRESETS)


def test_a_training_preset_of_its_own_trains_its_model_preset():
    fast, base = load_config("shakespeare-char-fast"), load_config("shakespeare-char")
    assert fast.preset == "shakespeare-char" and fast.max_steps < base.max_steps
    assert (fast.batch_size, fast.block_size, fast.dropout, fast.eval_iters) == (64, 256, 0.2, 200)
    muon = load_config("shakespeare-char-muon")  # nanoGPT's batch, data split and evaluation; its own model preset
    assert (muon.preset, muon.optimizer, muon.decay) == ("shakespeare-char-muon", "muon", "trapezoid")
    assert (muon.batch_size, muon.block_size, muon.eval_iters, muon.compile_mode) == (64, 256, 200, "default")
    best = load_config("shakespeare-char-60s")  # the Muon recipe, noised inputs, the average evaluated exactly
    assert (best.preset, best.optimizer, best.batch_size, best.block_size) == ("shakespeare-char-muon", "muon", 64, 256)
    assert (best.input_noise, best.dropout, best.ema_decay, best.eval_mode) == (0.1, 0.15, 0.995, "val-full")


def test_shakespeare_char_is_nanogpts_recipe():
    c = TRAIN_PRESETS["shakespeare-char"]
    assert (c.batch_size, c.block_size, c.lr, c.max_steps, c.warmup, c.min_lr) == (64, 256, 1e-3, 5000, 100, 1e-4)
    assert (c.betas, c.eval_interval, c.eval_iters, c.dropout, c.weight_decay, c.grad_clip) == (
        (0.9, 0.99),
        250,
        200,
        0.2,
        0.1,
        1.0,
    )
    assert c.tokenizer == "char"


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(
        "tiny",
        overrides=parse_overrides(
            ["lr=3e-4", "max_steps=5e3", "compile=true", "betas=0.8,0.95", "dropout=0.1", "device=cpu"]
        ),
    )
    assert cfg.lr == 3e-4 and cfg.max_steps == 5000 and cfg.compile is True and cfg.compile_mode == "default"
    assert cfg.betas == (0.8, 0.95) and cfg.dropout == 0.1 and cfg.device == "cpu"
    assert cfg.preset == "tiny" and cfg.batch_size == TRAIN_PRESETS["tiny"].batch_size


@pytest.mark.parametrize(
    "item, key, words",
    [
        ("nope=1", "nope", "unknown config key"),
        ("lr=-1", "lr", "(0.0, 10.0]"),
        ("lr=abc", "lr", "lr must be a number"),
        ("max_steps=0", "max_steps", "[1, "),
        ("max_steps=2.5", "max_steps", "integer"),
        ("dtype=int8", "dtype", "['float32', 'bfloat16', 'float16']"),
        ("tokenizer=word", "tokenizer", "['char', 'byte', 'bpe']"),
        ("compile=maybe", "compile", "true or false"),
        (
            "compile_mode=fast",
            "compile_mode",
            "['none', 'default', 'reduce-overhead', 'reduce-overhead-tuned', 'max-autotune']",
        ),
        ("grad_checkpointing=2", "grad_checkpointing", "true or false"),
        ("betas=0.9", "betas", "two numbers"),
        ("device=tpu", "device", "cuda:N"),
        ("min_lr=1", "min_lr", "lr="),
        ("grad_accum=3", "grad_accum", "divide batch_size"),
        ("kernel_names=flash", "kernel_names", "allowed: flash_attention, decode_attention, add_norm, norm, swiglu"),
    ],
)
def test_bad_values_name_the_key_and_range(item, key, words):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=parse_overrides([item]))
    assert info.value.key == key
    assert key in str(info.value) and words in str(info.value)


def test_unknown_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="preset must be one of"):
        load_config("huge")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    TrainConfig(preset="small", lr=2e-3, max_steps=7).to_yaml(path)
    cfg = load_config(None, path, {"max_steps": "9"})
    assert (cfg.preset, cfg.lr, cfg.max_steps) == ("small", 2e-3, 9)
    path.write_text("preset: tiny\nlr: 1e-3\nwarmup: 3\n")  # PyYAML reads 1e-3 as a string
    cfg = load_config(None, path)
    assert (cfg.preset, cfg.lr, cfg.warmup) == ("tiny", 1e-3, 3)


def test_micro_batch_plan():
    assert micro_batch_plan(64, 1, 1) == (64, 1)
    assert micro_batch_plan(64, 1, 2) == (32, 1)
    assert micro_batch_plan(480, 40, 8) == (12, 5)
    assert micro_batch_plan(480, 40, 1) == (12, 40)
    with pytest.raises(ConfigError, match="world size"):
        micro_batch_plan(480, 40, 3)
    with pytest.raises(ConfigError, match="batch_size"):
        micro_batch_plan(10, 1, 4)


def test_compile_mode_and_the_old_compile_flag(tmp_path):
    assert TRAIN_PRESETS["tiny"].compile_mode == "none" and TRAIN_PRESETS["shakespeare-char"].compile_mode == "default"
    for mode in ("none", "default", "reduce-overhead", "max-autotune"):
        cfg = load_config("tiny", overrides={"compile_mode": mode})
        assert cfg.compile_mode == mode and cfg.compile is (mode != "none")
    assert load_config("shakespeare-char", overrides={"compile": "false"}).compile_mode == "none"
    path = tmp_path / "old.yaml"
    path.write_text("preset: tiny\ncompile: true\n")  # a file written before compile_mode existed
    assert load_config(None, path).compile_mode == "default"
    assert load_config(None, path, {"compile_mode": "max-autotune"}).compile_mode == "max-autotune"  # later wins
    assert TRAIN_PRESETS["tiny"].replace(compile=True).compile_mode == "default"
    assert "compile" not in TRAIN_PRESETS["tiny"].to_dict() and "compile_mode" in TRAIN_PRESETS["tiny"].to_dict()
    with pytest.raises(ConfigError, match="contradicts compile_mode") as info:
        load_config("tiny", overrides={"compile": "true", "compile_mode": "none"})
    assert info.value.key == "compile"
    assert load_config("tiny", overrides={"compile": "true", "compile_mode": "default"}).compile


def test_grad_checkpointing_override():
    assert load_config("tiny", overrides=parse_overrides(["grad_checkpointing=on"])).grad_checkpointing is True
    assert TRAIN_PRESETS["tiny"].grad_checkpointing is False


def test_kernel_names_turn_on_only_the_named_kernels():
    from model.layers import _scope_choice, use_kernels

    cfg = load_config("tiny", overrides=parse_overrides(["kernel_names=flash_attention, add_norm"]))
    assert cfg.kernel_list == ("flash_attention", "add_norm")
    every, named = cfg.kernel_switches
    with use_kernels(every, **named):  # as train() enters it
        assert _scope_choice("flash_attention") is True and _scope_choice("add_norm") is True
        assert _scope_choice("decode_attention") is False and _scope_choice("norm") is False
    assert load_config("tiny").kernel_switches == (False, {})
    with pytest.raises(ConfigError, match="set kernels=false") as info:
        load_config("tiny", overrides=parse_overrides(["kernels=true", "kernel_names=add_norm"]))
    assert info.value.key == "kernel_names"


def test_step_graph_is_true_false_or_auto():
    """The GPU presets capture the step where the run allows it (auto); a YAML or command-line value parses to one of
    the three, anything else is named with the allowed values."""
    assert TRAIN_PRESETS["shakespeare-char"].step_graph == "auto" and TRAIN_PRESETS["tiny"].step_graph is False
    for raw, want in (("auto", "auto"), ("AUTO", "auto"), ("true", True), ("off", False)):
        assert load_config("tiny", overrides={"step_graph": raw}).step_graph == want
    for bad in ("sometimes", "2"):
        with pytest.raises(ConfigError, match=f"step_graph must be true, false or auto, got '{bad}'") as err:
            load_config("tiny", overrides={"step_graph": bad})
        assert err.value.key == "step_graph"
    with pytest.raises(ConfigError, match=r"step_graph must be true, false or auto, got 1"):
        TRAIN_PRESETS["tiny"].replace(step_graph=1)
    with pytest.raises(ConfigError, match=r"compile_optimizer must be false with step_graph=auto"):
        TRAIN_PRESETS["shakespeare-char"].replace(compile_optimizer=True)
