"""The HF folder loads in transformers (when installed) and gives the same logits; names map both families."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from exporter.conftest import GPT2_TINY, LLAMA_TINY
from exporter.errors import ExportError
from exporter.hf_export import export_hf, hf_architecture
from model.tokenizers import BPETokenizer, ByteTokenizer
from model.transformer import GPT


def _perturbed(config):
    """A random model with non-trivial norms and biases, so a mis-mapped tensor cannot go unnoticed."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


CASES = {
    "llama-gqa": LLAMA_TINY,
    "llama-bias-untied": LLAMA_TINY.replace(bias=True, tie_weights=False),
    "gpt2": GPT2_TINY,
}


@pytest.mark.parametrize("config", CASES.values(), ids=CASES.keys())
def test_transformers_loads_it_with_the_same_logits(config, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    model = _perturbed(config)
    export_hf(model, ByteTokenizer(), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", CASES.values(), ids=CASES.keys())
def test_every_weight_is_written_once_under_its_hf_name(config, tmp_path):
    model = _perturbed(config)
    summary = export_hf(model, ByteTokenizer(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    unique = {id(p) for p in model.parameters()}
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters() if id(p) in unique)
    prefix = "model.layers.0." if summary["architecture"] == "LlamaForCausalLM" else "transformer.h.0."
    assert any(name.startswith(prefix) for name in tensors)
    assert ("lm_head.weight" in tensors) == (not config.tie_weights)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == [summary["architecture"]]
    # Issue 22 finding 7: unset in a Llama export, transformers fell back to ids 1 and 2 (ordinary tokens here).
    assert hf_config["bos_token_id"] is None and hf_config["eos_token_id"] is None


def test_gpt2_fuses_qkv_and_transposes_conv1d(tmp_path):
    model = _perturbed(GPT2_TINY)
    export_hf(model, ByteTokenizer(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    attn = model.blocks[1].attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).T
    torch.testing.assert_close(tensors["transformer.h.1.attn.c_attn.weight"], fused.detach())


def test_tokenizer_goes_along(tmp_path):
    (tmp_path / "byte").mkdir()
    (tmp_path / "bpe").mkdir()
    export_hf(_perturbed(LLAMA_TINY), ByteTokenizer(), tmp_path / "byte")
    assert json.loads((tmp_path / "byte" / "tinylm_tokenizer.json").read_text())["type"] == "byte"
    bpe = BPETokenizer.train("the king shall speak of love and death to thee " * 50, 300)
    export_hf(_perturbed(LLAMA_TINY.replace(vocab_size=max(32, bpe.vocab_size))), bpe, tmp_path / "bpe")
    tokenizers = pytest.importorskip("tokenizers")
    loaded = tokenizers.Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    assert loaded.encode("the king").ids == bpe.encode("the king")


def test_architecture_choice_and_refusal():
    assert hf_architecture(LLAMA_TINY) == "llama" and hf_architecture(GPT2_TINY) == "gpt2"
    for odd in (GPT2_TINY.replace(bias=False), LLAMA_TINY.replace(pos="learned"), GPT2_TINY.replace(n_kv_head=1)):
        with pytest.raises(ExportError, match="no standard transformers architecture"):
            hf_architecture(odd)
    with pytest.raises(ExportError, match="no standard transformers architecture.*mlp=relu2"):
        hf_architecture(GPT2_TINY.replace(mlp="relu2"))
    with pytest.raises(ExportError, match="qk_norm=true has no transformers"):
        hf_architecture(GPT2_TINY.replace(qk_norm=True))
