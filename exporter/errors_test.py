"""Bad input and failed exports get a clear error and leave the artifact exactly as it was."""

from __future__ import annotations

import json

import pytest

from exporter.conftest import GPT2_TINY, LLAMA_TINY, TEXT, listing, save_random
from model import onnx_contract as contract
from exporter.errors import ExportError, GateFailed
from exporter.export import PARITY_FILE, export_artifact
from exporter.formats import FORMATS, onnx_variants, parse_formats
from exporter.gates import Gates


def test_parse_formats_normalises_and_lists_the_allowed_ones():
    assert parse_formats(None) == tuple(FORMATS) == parse_formats([]) == parse_formats("")
    assert parse_formats("int4, ONNX") == ("onnx", "int4")
    assert parse_formats(["hf", "int8", "hf"]) == ("int8", "hf")
    with pytest.raises(ExportError) as err:
        parse_formats("onnx,tflite")
    assert "tflite" in str(err.value) and all(name in str(err.value) for name in FORMATS)


def test_onnx_variants_always_include_the_fp32_reference():
    assert onnx_variants(["int4"]) == ("fp32", "int4")
    assert onnx_variants(["onnx", "int8"]) == ("fp32", "fp16", "int8")
    assert onnx_variants(["coreml", "hf"]) == ()


def test_unknown_format_leaves_nothing(tmp_path):
    path = save_random(tmp_path, LLAMA_TINY)
    before = listing(path)
    with pytest.raises(ExportError, match="formats: unknown"):
        export_artifact(path, ["onnx", "savedmodel"])
    assert listing(path) == before


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_artifact(tmp_path / "no-such-model", ["onnx"])


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: (p / "model.safetensors").write_bytes(b"\0" * 64), "sha256"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "config.json").unlink(), "missing config.json"),
    ],
)
def test_corrupt_artifact_is_refused_and_left_alone(tmp_path, damage, words):
    path = save_random(tmp_path, LLAMA_TINY)
    damage(path)
    before = listing(path)
    with pytest.raises(ExportError, match=words):
        export_artifact(path, ["onnx"], eval_text=TEXT)
    assert listing(path) == before


def test_a_tokenizer_larger_than_the_model_is_refused_before_export(tmp_path):
    """Issue 22 finding 2: such an artifact (re-hashed) exported until an IndexError."""
    from model.artifact import CONTENT_FILES, ID_LEN, _content_hash, _sha256
    from model.tokenizers import ByteTokenizer

    path = save_random(tmp_path, LLAMA_TINY)
    (path / "tokenizer.json").write_text(ByteTokenizer().to_json())  # 256 ids for a small vocabulary
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {f: _sha256(path / f) for f in CONTENT_FILES}
    manifest["id"] = _content_hash(manifest["files"])[:ID_LEN]
    (path / "manifest.json").write_text(json.dumps(manifest))
    before = listing(path)
    with pytest.raises(ExportError, match=r"model: .*tokenizer.json has 256 tokens but the model's vocabulary"):
        export_artifact(path, ["onnx"], eval_text=TEXT)
    assert listing(path) == before


def test_hf_refuses_a_config_without_a_transformers_architecture(tmp_path):
    odd = GPT2_TINY.replace(norm="rmsnorm")  # GPT-2 layout with RMSNorm: neither Llama nor GPT-2
    path = save_random(tmp_path, odd)
    before = listing(path)
    with pytest.raises(ExportError, match="hf: .*supported: Llama style"):
        export_artifact(path, ["onnx", "hf"], eval_text=TEXT)
    assert listing(path) == before


def test_eval_text_too_short_for_one_window(tmp_path):
    path = save_random(tmp_path, LLAMA_TINY)
    before = listing(path)
    with pytest.raises(ExportError, match="eval text: held-out text has"):
        export_artifact(path, ["hf"], eval_text="to be")
    assert listing(path) == before


# A limit no real export meets: ORT and PyTorch never agree to 1e-12 on every logit.
IMPOSSIBLE = Gates(fp32_max_abs_logits=1e-12)


def test_failed_gate_writes_nothing(tmp_path):
    path = save_random(tmp_path, LLAMA_TINY)
    before = listing(path)
    with pytest.raises(GateFailed) as err:
        export_artifact(path, ["onnx"], eval_text=TEXT, gates=IMPOSSIBLE)
    assert "onnx-fp32: max_abs_logits" in str(err.value) and "--no-gate" in str(err.value)
    assert err.value.report["status"] == "failed" and not err.value.report["variants"]["onnx-fp32"]["passed"]
    assert listing(path) == before


def test_no_gate_keeps_failed_files_marked_failed(tmp_path):
    path = save_random(tmp_path, LLAMA_TINY)
    report = export_artifact(path, ["onnx"], eval_text=TEXT, gates=IMPOSSIBLE, no_gate=True)
    assert report["status"] == "failed" and not report["gated"]
    meta = contract.read_meta(path)
    assert meta["files"]["fp32"]["gate"] == "failed" and meta["files"]["fp16"]["gate"] == "passed"  # fp16: not gated
    assert (path / "onnx" / "model.onnx").is_file() and (path / "onnx" / "model-fp16.onnx").is_file()
    assert json.loads((path / PARITY_FILE).read_text())["status"] == "failed"


def test_cancel_midway_writes_nothing(tmp_path):
    path = save_random(tmp_path, LLAMA_TINY)
    before = listing(path)
    calls = []

    def cancel_on_second_check():
        calls.append(1)
        if len(calls) == 2:  # after the fp32 file was built and measured, before int8
            raise ExportError("cancelled")

    with pytest.raises(ExportError, match="cancelled"):
        export_artifact(path, ["int8"], eval_text=TEXT, check_cancelled=cancel_on_second_check)
    assert len(calls) == 2 and listing(path) == before
