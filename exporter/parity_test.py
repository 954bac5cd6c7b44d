"""Parity measurement, gates, the table, and atomic publishing, on small random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.conftest import LLAMA_TINY, TEXT
from exporter.gates import Gates, apply_gates
from exporter.onnx_export import export_fp32
from exporter.onnx_quantize import quantize_int4
from exporter.parity import HELD_OUT_FRACTION, ParitySettings, Reference, held_out_text, measure_onnx
from exporter.parity_table import format_table
from exporter.staging import Staging
from model.tokenizers import CharTokenizer
from model.transformer import GPT

SMALL = ParitySettings(
    n_prompts=2, prompt_len=8, decode_prompts=2, decode_prompt_len=4, decode_steps=6, eval_window=16, eval_tokens=64
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = CharTokenizer.from_corpus(TEXT)
    torch.manual_seed(0)
    model = GPT(LLAMA_TINY.replace(vocab_size=tokenizer.vocab_size)).eval()
    folder = tmp_path_factory.mktemp("parity")
    export_fp32(model, folder / "model.onnx")
    quantize_int4(folder / "model.onnx", folder / "model-int4.onnx")
    return model, tokenizer, folder


def test_reference_shapes_and_greedy_tokens(setup):
    model, tokenizer, _ = setup
    ref = Reference.build(model, tokenizer, TEXT, SMALL)
    assert ref.random_logits.shape == (2, 8, model.config.vocab_size) and ref.corpus_prompts.shape == (2, 8)
    assert ref.decode_tokens.shape == (2, 7) and ref.decode_logits.shape == (2, 6, model.config.vocab_size)
    assert ref.eval_windows.shape == (4, 17) and ref.eval_source == "corpus held-out tail"
    # The reference continuation is greedy under the full forward too (the KV-cache path agrees).
    seq = torch.from_numpy(np.concatenate([ref.decode_prompts, ref.decode_tokens[:, :-1]], axis=1))
    with torch.no_grad():
        full = model(seq)[0][:, ref.decode_prompts.shape[1] - 1 :].argmax(-1).numpy()
    np.testing.assert_array_equal(full, ref.decode_tokens)
    assert 0 < ref.val_loss < 10


def test_reference_without_eval_text_uses_model_samples(setup):
    model, tokenizer, _ = setup
    ref = Reference.build(model, tokenizer, None, SMALL)
    assert ref.eval_source.startswith("model samples") and ref.eval_windows.shape[1] == 17
    assert ref.eval_windows.max() < tokenizer.vocab_size
    # Windows as long as the context: samples of block_size + 1 tokens still fit the KV cache.
    block = model.config.block_size
    full = Reference.build(
        model, tokenizer, None, ParitySettings(eval_window=10 * block, eval_tokens=2 * block, decode_steps=4)
    )
    assert full.eval_windows.shape == (2, block + 1)


def test_fp32_file_measures_near_zero_and_int4_does_not(setup):
    model, tokenizer, folder = setup
    ref = Reference.build(model, tokenizer, TEXT, SMALL)
    fp32 = measure_onnx(folder / "model.onnx", ref)
    assert fp32["max_abs_logits"] < 1e-4 and fp32["greedy_agreement"] == 1.0 and abs(fp32["val_loss_delta"]) < 1e-4
    assert set(fp32["max_abs_logits_by_source"]) == {"random", "corpus", "decode"}
    int4 = measure_onnx(folder / "model-int4.onnx", ref)
    assert int4["max_abs_logits"] > 1e-4
    for measured in (fp32, int4):  # issue 22 finding 6: free-running agreement is reported beside teacher-forced
        assert 0.0 <= measured["free_running_agreement"] <= 1.0 and measured["free_running_tokens"] == 7
    assert fp32["free_running_agreement"] == 1.0 and fp32["free_running_first_divergence"] is None


class _ChainDecoder:
    """A stand-in decoder whose next token is a function of the last one (logits one-hot on it): `slip` maps one
    input token to a wrong successor, as a quantised model's slip on one context."""

    def __init__(self, vocab: int, slip: dict[int, int] | None = None) -> None:
        self.vocab, self.slip = vocab, slip or {}

    def _next(self, token: int) -> int:
        return self.slip.get(token, (token * 5 + 3) % self.vocab)

    def _logits(self, last: np.ndarray) -> np.ndarray:
        out = np.zeros((len(last), 1, self.vocab), dtype=np.float32)
        out[np.arange(len(last)), 0, [self._next(int(t)) for t in last]] = 1.0
        return out

    def prefill(self, prompts: np.ndarray):
        return self._logits(prompts[:, -1]), None

    def step(self, tokens: np.ndarray, past):
        return self._logits(tokens[:, 0]), None


def test_free_running_agreement_catches_the_drift_teacher_forcing_hides():
    """Issue 22 finding 6: an INT4 file agreed 0.968 teacher-forced, but its own greedy text left the reference's at
    token 9. One slip on one context: teacher-forced agreement stays high, free-running collapses after the slip."""
    from exporter.parity import _free_running

    vocab, steps = 64, 49
    exact = _ChainDecoder(vocab)
    prompts = np.array([[1, 2]], dtype=np.int64)
    tokens = [exact._next(2)]
    for _ in range(steps):
        tokens.append(exact._next(tokens[-1]))
    ref = Reference(random_prompts=None, random_logits=None, corpus_prompts=None, corpus_logits=None,
                    decode_prompts=prompts, decode_tokens=np.array([tokens]), decode_logits=None,
                    eval_windows=None, val_loss=0.0, eval_source="test")  # fmt: skip
    assert _free_running(exact, ref) == (1.0, None)
    drifting = _ChainDecoder(vocab, slip={tokens[8]: (tokens[9] + 1) % vocab})
    teacher_forced = np.mean([drifting._next(a) == b for a, b in zip(tokens[:-1], tokens[1:])])
    free, divergence = _free_running(drifting, ref)
    assert teacher_forced > 0.95 and divergence == 9 and free < 0.5
    results = apply_gates("onnx-int4", {"val_loss_delta": 0.01, "free_running_agreement": free}, Gates())
    assert [(g["metric"], g["passed"]) for g in results] == [
        ("val_loss_delta", True),
        ("free_running_agreement", False),
    ]
    int8 = apply_gates("onnx-int8", {"greedy_agreement": teacher_forced, "free_running_agreement": free}, Gates())
    assert [g["passed"] for g in int8] == [True, False]


def test_gates_pass_fail_and_skip_unmeasured():
    gates = Gates()
    ok = apply_gates("onnx-int8", {"greedy_agreement": 0.97, "val_loss_delta": 0.01}, gates)
    assert [g["passed"] for g in ok] == [True, True]
    bad = apply_gates("onnx-int8", {"greedy_agreement": 0.90, "val_loss_delta": 0.03}, gates)
    assert [g["passed"] for g in bad] == [False, False]
    assert apply_gates("onnx-int4", {"val_loss_delta": -0.2}, gates)[0]["passed"]  # better is fine
    assert apply_gates("onnx-fp16", {"max_abs_logits": 5.0}, gates) == []  # reported, not gated
    assert apply_gates("hf", {"skipped": "transformers is not installed"}, gates) == []
    with pytest.raises(ValueError, match="int8_greedy_agreement"):
        Gates(int8_greedy_agreement=1.5)


def test_table_lists_every_variant_and_the_verdict():
    entry = {
        "bytes": 2048,
        "max_abs_logits": 1e-6,
        "val_loss": 2.0,
        "val_loss_delta": 0.0,
        "greedy_agreement": 1.0,
        "free_running_agreement": 0.36,
    }
    report = {
        "model_id": "abc", "gated": False, "passed": False,
        "reference": {"val_loss": 2.0, "eval_windows": 4, "eval_window_tokens": 16, "eval_source": "x", "decode_steps": 6},
        "variants": {
            "onnx-fp32": {**entry, "gates": [{"metric": "max_abs_logits", "passed": True}], "passed": True},
            "onnx-int4": {**entry, "gates": [{"metric": "val_loss_delta", "passed": False}], "passed": False},
        },
    }  # fmt: skip
    table = format_table(report)
    assert "onnx-fp32" in table and "2.0 KB" in table and "FAIL val_loss_delta" in table
    assert "GATE FAILED (--no-gate: files kept, marked failed)" in table
    assert "free-running" in table and "36.0%" in table and "100.0%" in table  # both agreements, side by side


def test_held_out_text_is_the_tail():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    assert held_out_text(text) == text[-int(1000 * HELD_OUT_FRACTION) :]


def test_staging_publishes_atomically_and_cleans_up(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "old.onnx").write_text("old")
    with Staging(tmp_path) as staging:
        (staging.folder("onnx") / "new.onnx").write_text("new")
        (staging.root / "parity.json").write_text("{}")
        staging.publish(["onnx", "parity.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "parity.json"]
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["new.onnx"]
    with pytest.raises(RuntimeError), Staging(tmp_path) as staging:
        (staging.folder("coreml") / "x").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "parity.json"]
