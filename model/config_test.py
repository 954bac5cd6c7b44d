"""Tests of ModelConfig validation and (de)serialisation, and of the presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from model.config import ModelConfig
from model.presets import PRESETS, get_preset


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("vocab_size", 0, "vocab_size must be an integer in [1,"),
        ("n_layer", 2.5, "n_layer must be an integer"),
        ("n_head", True, "n_head must be an integer"),
        ("n_kv_head", 5, "n_kv_head must be an integer in [1, 4]"),
        ("n_kv_head", 3, "n_kv_head must divide n_head=4"),
        ("n_embd", 30, "n_embd must be a multiple of n_head=4"),
        ("dropout", 1.0, "dropout must be a number in [0.0, 1.0)"),
        ("norm", "batchnorm", "norm must be one of ['rmsnorm', 'layernorm']"),
        ("pos", "alibi", "pos must be one of ['rope', 'learned']"),
        ("mlp", "relu", "mlp must be one of ['swiglu', 'gelu', 'relu2']"),
        ("qk_norm", "yes", "qk_norm must be true or false"),
        ("bias", 1, "bias must be true or false"),
        ("norm_eps", 0.0, "norm_eps must be a number in (0.0, 1.0)"),
        ("rope_theta", float("nan"), "rope_theta must be a number"),
        ("mlp_hidden", -1, "mlp_hidden must be an integer in [0,"),
    ],
)
def test_bad_values_name_field_and_range(field, value, words):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{"n_head": 4, "n_embd": 32, field: value})
    assert words in str(err.value)


def test_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(n_head=4, n_embd=12, pos="rope")


def test_defaults_and_derived():
    c = ModelConfig(n_head=8, n_embd=256, mlp="swiglu")
    assert c.n_kv_head == 8  # None resolves to MHA
    assert c.head_dim == 32 and c.kv_dim == 256
    assert c.hidden_dim == 704  # 8/3 * 256 = 682.7, rounded up to a multiple of 64
    assert c.replace(mlp="gelu").hidden_dim == 1024
    assert c.replace(mlp_hidden=100).hidden_dim == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layer = 3  # type: ignore[misc]


def test_dict_json_yaml_round_trip(tmp_path):
    c = ModelConfig(vocab_size=99, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, dropout=0, norm="rmsnorm")
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    c.to_yaml(tmp_path / "m.yaml")
    assert ModelConfig.from_yaml(tmp_path / "m.yaml") == c
    assert isinstance(ModelConfig.from_yaml(tmp_path / "m.yaml").dropout, float)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['n_layers'\]"):
        ModelConfig.from_dict({"n_layers": 3})


def test_presets_shapes():
    expect = {
        "shakespeare-char": (6, 6, 384, 256),
        "shakespeare-char-muon": (6, 6, 384, 256),
        "shakespeare-char-muon-l8": (8, 6, 336, 256),
        "shakespeare-char-muon-l10": (10, 6, 288, 256),
        "tiny": (4, 4, 128, 128),
        "small": (6, 8, 256, 256),
        "medium": (12, 8, 512, 512),
        "large": (24, 12, 768, 1024),
        "gpt2-124m": (12, 12, 768, 1024),
    }
    assert set(PRESETS) == set(expect)
    for name, (n_layer, n_head, n_embd, block) in expect.items():
        c = get_preset(name)
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (n_layer, n_head, n_embd, block), name
    sc = get_preset("shakespeare-char")
    assert (sc.vocab_size, sc.dropout, sc.norm, sc.pos, sc.mlp, sc.bias, sc.tie_weights) == (
        65,
        0.2,
        "layernorm",
        "learned",
        "gelu",
        True,
        True,
    )
    muon = get_preset("shakespeare-char-muon")  # nanoGPT's baby GPT with QK-norm, ReLU² and an untied head
    assert muon == sc.replace(mlp="relu2", qk_norm=True, tie_weights=False)
    for name, (layers, width) in {"shakespeare-char-muon-l8": (8, 336), "shakespeare-char-muon-l10": (10, 288)}.items():
        assert get_preset(name) == muon.replace(n_layer=layers, n_embd=width), name  # only the shape differs
    assert get_preset("gpt2-124m").vocab_size == 50304
    for name in ("tiny", "small", "medium", "large"):
        c = get_preset(name)
        assert (c.norm, c.pos, c.mlp, c.bias) == ("rmsnorm", "rope", "swiglu", False), name


def test_get_preset_overrides_and_unknown():
    c = get_preset("small", vocab_size=123, dropout=0.0)
    assert c.vocab_size == 123 and c.dropout == 0.0 and PRESETS["small"].vocab_size != 123
    assert get_preset("shakespeare-char", n_head=4).n_kv_head == 4  # MHA stays MHA
    assert get_preset("small", n_head=4).n_kv_head == 2  # GQA keeps its group of 2
    with pytest.raises(ValueError, match="preset must be one of .*'gpt2-124m'.*got 'huge'"):
        get_preset("huge")
