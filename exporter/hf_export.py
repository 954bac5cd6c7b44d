"""The Hugging Face format: `hf/config.json` + `hf/model.safetensors` with transformers' parameter names.

Llama-style configs (rmsnorm, rope, swiglu; the tiny/small/medium/large presets) become `LlamaForCausalLM`:
tinylm's block already uses Llama's projection names and RoPE's rotate-half layout, so the weights map one to
one. GPT-2-style configs (layernorm, learned positions, exact GELU, biases, MHA; shakespeare-char, gpt2-124m)
become `GPT2LMHeadModel`: q/k/v are fused into `c_attn`, and every projection is stored transposed, since
GPT-2's `Conv1D` keeps weights as (in, out). Other mixes have no standard architecture and are refused.
The tokenizer goes along: a BPE one as the `tokenizers` JSON transformers reads, a char/byte one as
tinylm's own `tinylm_tokenizer.json` (transformers has no char-level tokenizer format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from exporter.errors import ExportError
from model.config import ModelConfig
from model.transformer import GPT

__all__ = ["HF_DIR", "hf_architecture", "export_hf"]

HF_DIR = "hf"


def hf_architecture(config: ModelConfig) -> str:
    """ "llama" or "gpt2" for a config transformers can load; ExportError naming what does not fit otherwise."""
    if config.qk_norm:
        raise ExportError(
            "hf: qk_norm=true has no transformers Llama or GPT-2 equivalent (their attention does not normalise q and "
            "k); export this model as onnx or coreml, or train it with qk_norm=false"
        )
    if config.norm == "rmsnorm" and config.pos == "rope" and config.mlp == "swiglu":
        return "llama"
    if config.norm == "layernorm" and config.pos == "learned" and config.mlp == "gelu":
        if config.bias and config.n_kv_head == config.n_head:
            return "gpt2"
    raise ExportError(
        "hf: this model has no standard transformers architecture "
        f"(norm={config.norm}, pos={config.pos}, mlp={config.mlp}, bias={config.bias}, "
        f"n_kv_head={config.n_kv_head}/n_head={config.n_head}); supported: Llama style "
        "(rmsnorm + rope + swiglu) and GPT-2 style (layernorm + learned + gelu, bias=true, n_kv_head = n_head)"
    )


def _llama(model: GPT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c = model.config
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias,
        "mlp_bias": c.bias,
        "tie_word_embeddings": c.tie_weights,
        "bos_token_id": None,  # LlamaConfig's defaults (1, 2) are ordinary tokens of a tinylm vocabulary
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    names = {"tok_emb.": "model.embed_tokens.", "norm_f.": "model.norm.", "lm_head.": "lm_head."}
    block = {
        "norm_1.": "input_layernorm.",
        "norm_2.": "post_attention_layernorm.",
        "attn.": "self_attn.",
        "mlp.": "mlp.",
    }
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, layer, rest = name.split(".", 2)
            prefix = next(p for p in block if rest.startswith(p))
            weights[f"model.layers.{layer}.{block[prefix]}{rest[len(prefix) :]}"] = tensor
        else:
            prefix = next(p for p in names if name.startswith(p))
            weights[names[prefix] + name[len(prefix) :]] = tensor
    return config, weights


def _gpt2(model: GPT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c = model.config
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.hidden_dim,
        "activation_function": "gelu",  # exact (erf) GELU, as tinylm trains; GPT-2's own is "gelu_new"
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": c.tie_weights,
        "bos_token_id": None,  # GPT-2's defaults (50256) lie outside a small vocabulary
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    s = model.state_dict()
    w = {"transformer.wte.weight": s["tok_emb.weight"], "transformer.wpe.weight": s["pos_emb.weight"]}
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
            w[f"{h}{theirs}.weight"], w[f"{h}{theirs}.bias"] = s[f"{p}{ours}.weight"], s[f"{p}{ours}.bias"]
        qkv = [f"{p}attn.{x}_proj" for x in "qkv"]
        w[f"{h}attn.c_attn.weight"] = torch.cat([s[f"{n}.weight"] for n in qkv]).T  # (C, 3C): Conv1D is (in, out)
        w[f"{h}attn.c_attn.bias"] = torch.cat([s[f"{n}.bias"] for n in qkv])
        for ours, theirs in (
            ("attn.o_proj", "attn.c_proj"),
            ("mlp.up_proj", "mlp.c_fc"),
            ("mlp.down_proj", "mlp.c_proj"),
        ):
            w[f"{h}{theirs}.weight"] = s[f"{p}{ours}.weight"].T
            w[f"{h}{theirs}.bias"] = s[f"{p}{ours}.bias"]
    w["transformer.ln_f.weight"], w["transformer.ln_f.bias"] = s["norm_f.weight"], s["norm_f.bias"]
    w["lm_head.weight"] = s["lm_head.weight"]
    return config, w


def export_hf(model: GPT, tokenizer: Any, out_dir: Path) -> dict[str, Any]:
    """Write config.json, model.safetensors and the tokenizer into `out_dir`; returns a summary."""
    arch = hf_architecture(model.config)
    config, weights = (_llama if arch == "llama" else _gpt2)(model)
    if model.config.tie_weights:
        weights.pop("lm_head.weight", None)  # transformers re-ties it to the embedding
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(tokenizer, "hf_json"):
        (out_dir / "tokenizer.json").write_text(tokenizer.hf_json(), encoding="utf-8")
        tokenizer_file = "tokenizer.json"
    else:
        (out_dir / "tinylm_tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        tokenizer_file = "tinylm_tokenizer.json"
    return {"architecture": config["architectures"][0], "n_tensors": len(weights), "tokenizer": tokenizer_file}
