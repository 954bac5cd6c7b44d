"""CoreML packages: interface and quantized weights checked through the spec on any OS; traced graphs checked
against the model; prediction parity only where Core ML runs (macOS)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from exporter.conftest import GPT2_TINY, LLAMA_TINY
from exporter.coreml_export import VARIANTS, export_coreml, trace_parity
from model.transformer import GPT


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(LLAMA_TINY).eval()
    out = tmp_path_factory.mktemp("coreml")
    prompt = torch.randint(0, LLAMA_TINY.vocab_size, (1, 12))
    summaries, diffs = export_coreml(model, out, prompt)
    return model, out, summaries, diffs


def test_every_variant_is_written_with_its_interface(packages):
    model, out, summaries, _ = packages
    c = model.config
    assert set(summaries) == {v.name for v in VARIANTS}
    for variant in VARIANTS:
        s = summaries[variant.name]
        assert (out / variant.file / "Manifest.json").is_file()
        assert s["outputs"] == ["logits"]
        if variant.stateful:
            assert s["inputs"] == ["input_ids", "causal_mask"]
            assert s["states"] == {
                name: [c.n_layer, 1, c.n_kv_head, c.block_size, c.head_dim] for name in ("key_cache", "value_cache")
            }
        else:
            assert s["inputs"] == ["input_ids"] and s["states"] == {}
        assert (s["quantized_weight_ops"] > 0) == (variant.weights != "fp16")


def test_compressed_packages_are_smaller(packages):
    _, out, _, _ = packages

    def size(name):
        return sum(p.stat().st_size for p in (out / f"{name}.mlpackage").rglob("*") if p.is_file())

    for kind in ("stateful", "stateless"):
        assert size(f"model-{kind}") > size(f"model-{kind}-int8") > size(f"model-{kind}-int4")


@pytest.mark.parametrize("config", [LLAMA_TINY, GPT2_TINY], ids=["llama-gqa", "gpt2"])
def test_traced_graphs_are_shape_general(config):
    """Prefill then one-token steps through the traced stateful graph reproduce the full forward."""
    torch.manual_seed(1)
    model = GPT(config).eval()
    diffs = trace_parity(model, torch.randint(0, config.vocab_size, (1, 10)), steps=4)
    assert diffs["stateful_max_abs_diff"] < 1e-4 and diffs["stateless_max_abs_diff"] < 1e-4


def test_export_reports_trace_parity(packages):
    assert max(packages[3].values()) < 1e-4


@pytest.mark.skipif(
    sys.platform != "darwin", reason="Core ML prediction needs macOS (coremltools' predict is macOS-only)"
)
def test_stateful_prediction_matches_torch_on_macos(packages):
    import coremltools as ct

    model, out, _, _ = packages
    mlmodel = ct.models.MLModel(str(out / "model-stateful.mlpackage"))
    state = mlmodel.make_state()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        expected = model(ids)[0].numpy()
    got = [mlmodel.predict({"input_ids": ids[:, :5].numpy().astype(np.int32),
                            "causal_mask": np.zeros((1, 1, 5, 5), np.float16)}, state)["logits"]]  # fmt: skip
    for t in range(5, 8):
        feed = {
            "input_ids": ids[:, t : t + 1].numpy().astype(np.int32),
            "causal_mask": np.zeros((1, 1, 1, t + 1), np.float16),
        }
        got.append(mlmodel.predict(feed, state)["logits"])
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=5e-2)  # fp16 compute
