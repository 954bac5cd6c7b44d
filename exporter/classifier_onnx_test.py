"""Classifier ONNX export: ORT logits match PyTorch on padded batches of other sizes than the example's."""

from __future__ import annotations

import pytest
import torch

from exporter.classifier_onnx import ATTENTION_MASK, INPUT_IDS, LOGITS, classifier_parity, export_classifier
from exporter.errors import GateFailed
from model.classifier import SequenceClassifier, pad_batch
from model.config import ModelConfig
from model.testing import llama_test_config
from model.transformer import GPT

CONFIGS = {
    "llama": llama_test_config(vocab_size=40, block_size=32),
    "gpt2": ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=32),
}


def _batch(seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return pad_batch([torch.randint(0, 40, (n,), generator=gen).tolist() for n in lengths], max_len=32)


@pytest.mark.parametrize("name,pooling", [("llama", "last"), ("gpt2", "mean")])
def test_onnx_logits_match_torch(tmp_path, name, pooling):
    torch.manual_seed(0)
    clf = SequenceClassifier(GPT(CONFIGS[name]), 3, pooling=pooling)
    with torch.no_grad():
        clf.head.weight.normal_(std=1.0)  # logits of size O(1): the 1e-4 bound is a real one
    path = export_classifier(clf, tmp_path / "clf.onnx")
    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == [INPUT_IDS, ATTENTION_MASK] and [o.name for o in graph.output] == [LOGITS]
    for seed, lengths in ((1, [7, 3, 12, 1]), (2, [30]), (3, [2, 2, 9])):  # batch 4, 1, 3; seq 12, 30, 9
        ids, mask = _batch(seed, lengths)
        report = classifier_parity(clf, path, ids, mask)
        assert report["passed"] and report["max_abs_diff"] <= 1e-4
        assert report["batch"] == len(lengths)


def test_gate_fails_when_the_model_differs(tmp_path):
    torch.manual_seed(0)
    clf = SequenceClassifier(GPT(CONFIGS["llama"]), 2)
    path = export_classifier(clf, tmp_path / "clf.onnx")
    with torch.no_grad():
        clf.head.bias.add_(0.5)  # the torch side changes after export
    ids, mask = _batch(4, [5, 8])
    with pytest.raises(GateFailed, match="parity failed") as info:
        classifier_parity(clf, path, ids, mask)
    assert info.value.report["max_abs_diff"] == pytest.approx(0.5, abs=1e-3)
