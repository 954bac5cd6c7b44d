"""Tests of artifact save/load: bit-identical logits, verification, pickle refusal, the store."""

from __future__ import annotations

import json
import os

import pytest
import torch

from model.artifact import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    load_artifact,
    save_artifact,
)
from model.tokenizers import CharTokenizer
from model.transformer import GPT
from model.testing import llama_test_config

TEXT = "to be, or not to be: that is the question.\n"


def _model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(llama_test_config(**{"vocab_size": 20, "block_size": 16, **kw})).eval()


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer.from_corpus(TEXT)


@pytest.mark.parametrize(
    ("tie", "extra"), [(True, {}), (False, {}), (False, dict(qk_norm=True, mlp="relu2"))], ids=["tied", "untied", "qk"]
)
def test_save_load_bit_identical(tmp_path, tok, tie, extra):
    model = _model(tie_weights=tie, **extra)
    model_id = save_artifact(tmp_path, model, tok, name="unit", preset="custom", metrics={"val_loss": 1.5})
    path = tmp_path / model_id
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    art = load_artifact(path)
    idx = torch.tensor([tok.encode(TEXT[:16])])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], art.model(idx)[0])
    assert art.config == model.config and art.tokenizer.encode(TEXT) == tok.encode(TEXT)
    assert (art.model.lm_head.weight is art.model.tok_emb.weight) == tie
    m = art.manifest
    assert m["id"] == model_id and m["name"] == "unit" and m["preset"] == "custom"
    assert m["metrics"] == {"val_loss": 1.5} and m["parent_id"] is None and m["created_at"]
    assert set(m["files"]) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert not art.model.training


def test_content_addressed_and_idempotent(tmp_path, tok):
    a = save_artifact(tmp_path, _model(0), tok, name="a", preset="p", metrics={})
    b = save_artifact(tmp_path, _model(0), tok, name="again", preset="p", metrics={})
    c = save_artifact(tmp_path, _model(1), tok, name="c", preset="p", metrics={}, parent_id=a)
    assert a == b != c
    assert len(a) == 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    assert json.loads((tmp_path / c / "manifest.json").read_text())["parent_id"] == a


def test_tampered_file_refused(tmp_path, tok):
    path = tmp_path / save_artifact(tmp_path, _model(), tok, name="x", preset="p", metrics={})
    cfg = json.loads((path / "config.json").read_text())
    cfg["dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"config.json has sha256 .* but the manifest says"):
        load_artifact(path)


def test_tampered_weights_refused(tmp_path, tok):
    path = tmp_path / save_artifact(tmp_path, _model(), tok, name="x", preset="p", metrics={})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors has sha256"):
        load_artifact(path)


def test_pickle_refused(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    with pytest.raises(ArtifactError, match="refusing to load .*ckpt.pt: pickle"):
        load_artifact(ckpt)
    with pytest.raises(ArtifactError, match=r"holds pickle weights \['ckpt.pt'\]"):
        load_artifact(tmp_path)


def test_extra_exporter_files_ignored(tmp_path, tok):
    model_id = save_artifact(tmp_path, _model(), tok, name="x", preset="p", metrics={})
    path = tmp_path / model_id
    (path / "onnx").mkdir()
    (path / "onnx" / "fp32.onnx").write_bytes(b"\x00" * 10)
    (path / "parity.json").write_text("{}")
    assert load_artifact(path / "model.safetensors").manifest["id"] == model_id


def test_refuses_non_plain_model(tmp_path, tok):
    model = _model()
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ArtifactError, match="plain float GPT"):
        save_artifact(tmp_path, model, tok, name="x", preset="p", metrics={})
    with pytest.raises(ArtifactError, match="smaller than the tokenizer"):
        save_artifact(tmp_path, _model(vocab_size=5), tok, name="x", preset="p", metrics={})


def test_store_list_resolve_remove(tmp_path, tok):
    store = ArtifactStore(tmp_path / "store")
    assert store.list() == []
    with pytest.raises(ArtifactNotFound):
        store.newest()
    a = save_artifact(store.root, _model(0), tok, name="first", preset="p", metrics={})
    b = save_artifact(store.root, _model(1), tok, name="second", preset="p", metrics={})
    os.utime(store.root / b, (2e9, 2e9))  # same-second saves: newest falls back to mtime
    assert {i.id for i in store.list()} == {a, b}
    assert store.newest().id == b
    assert store.resolve(a[:6]) == store.root / a
    assert store.resolve("second") == store.root / b
    assert store.load("first").manifest["id"] == a
    with pytest.raises(ArtifactNotFound, match=f"no artifact matches 'nope'.*{a} \\(first\\)"):
        store.resolve("nope")
    assert store.remove(a[:8]) == a
    assert [i.id for i in store.list()] == [b]
    assert not (store.root / a).exists()


def _rehash(path) -> None:
    """Make the manifest match the files again, as someone re-hashing a bad file would (the hash then passes)."""
    from model.artifact import CONTENT_FILES, ID_LEN, _content_hash, _sha256

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {f: _sha256(path / f) for f in CONTENT_FILES}
    manifest["id"] = _content_hash(manifest["files"])[:ID_LEN]
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", ["truncated", "empty", "pickle"])
def test_invalid_safetensors_under_the_right_hash_is_one_clear_error(tmp_path, tok, bad):
    """Issue 22 finding 2: a raw SafetensorError escaped load_artifact (and `serve` printed a traceback)."""
    path = tmp_path / save_artifact(tmp_path, _model(), tok, name="x", preset="p", metrics={})
    weights = path / "model.safetensors"
    if bad == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif bad == "empty":
        weights.write_bytes(b"")
    else:
        torch.save({"w": torch.zeros(2)}, weights)
    _rehash(path)
    with pytest.raises(ArtifactError, match=r"model.safetensors is not a valid safetensors file") as err:
        load_artifact(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, tok):
    """Issue 22 finding 2: such an artifact loaded and served, then every request failed."""
    big = CharTokenizer.from_corpus(TEXT + "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    path = tmp_path / save_artifact(tmp_path, _model(vocab_size=64), big, name="x", preset="p", metrics={})
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), "vocab_size": 20}))
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in _model(vocab_size=20).state_dict().items() if k != "lm_head.weight"},
        str(path / "model.safetensors"),
    )
    _rehash(path)
    with pytest.raises(ArtifactError, match=r"tokenizer.json has \d+ tokens but the model's vocabulary .* holds 20"):
        load_artifact(path)
