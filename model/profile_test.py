"""Tests of the analytic profile: parameter counts match real models; FLOPs and memory formulas."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import ModelConfig
from model.info_main import main
from model.presets import get_preset
from model.profile import format_profile, param_counts, profile_model
from model.transformer import GPT


@pytest.mark.parametrize(
    "kw",
    [
        dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_weights=True),
        dict(norm="layernorm", pos="learned", mlp="gelu", bias=False, tie_weights=False),
        dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_weights=True, n_kv_head=1),
        dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=True, tie_weights=False, n_kv_head=2, mlp_hidden=40),
    ],
)
def test_param_counts_match_model(kw):
    config = ModelConfig(**{"vocab_size": 50, "n_layer": 3, "n_head": 4, "n_embd": 32, "block_size": 16, **kw})
    model = GPT(config)
    counts = param_counts(config)
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert counts["matmul"] == linear  # every nn.Linear weight, the LM head included even when tied


def test_shakespeare_char_is_10_7m():
    d = profile_model(get_preset("shakespeare-char"))
    assert 10.6e6 < d["params"]["total"] < 10.8e6
    assert d["params"]["non_embedding"] == 10_672_512
    assert d["seq_len"] == 256 and d["batch_size"] == 1


def test_gpt2_124m():
    assert 123e6 < profile_model(get_preset("gpt2-124m"))["params"]["total"] < 125e6


def test_flops_and_memory_formulas():
    config = get_preset("tiny")
    d = profile_model(config, batch_size=4, seq_len=64, dtype="float32")
    p, f, m = d["params"], d["flops"], d["memory"]
    # nanoGPT / PaLM: training = 6N + 12 * L * C * T per token
    assert f["training_per_token"] == 6 * p["matmul"] + 12 * config.n_layer * config.n_embd * 64
    assert f["training_per_step"] == f["training_per_token"] * 4 * 64
    # K and V: 2 * layers * kv_heads * head_dim * tokens * 4 bytes
    assert m["kv_cache_bytes"] == 2 * 4 * 2 * 32 * (4 * 64) * 4
    assert m["weights_bytes"] == 4 * p["total"]
    half = profile_model(config, batch_size=8, seq_len=64)
    assert half["memory"]["activation_bytes"] > m["activation_bytes"]  # twice the tokens, half the bytes + fp32 parts


def test_validation():
    with pytest.raises(ValueError, match=r"seq_len must be an integer in \[1, 128\]"):
        profile_model(get_preset("tiny"), seq_len=1000)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        profile_model(get_preset("tiny"), batch_size=0)


def test_format_and_cli(capsys):
    text = format_profile(profile_model(get_preset("shakespeare-char")))
    assert "10.77M" in text and "KV cache" in text and "FLOPs/token train" in text
    assert main(["--preset", "small", "--json", "--batch-size", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["preset"] == "small" and d["batch_size"] == 2 and d["params"]["total"] > 0
    assert main(["--preset", "tiny"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["--preset", "tiny", "--seq-len", "999"]) == 2
    assert "seq_len must be" in capsys.readouterr().err


def test_cli_accepts_the_info_word(capsys):
    # `./tinylm model info --preset NAME` hands `info --preset NAME` to this main.
    assert main(["info", "--preset", "shakespeare-char", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "shakespeare-char" and 10.6e6 < out["params"]["total"] < 10.8e6
