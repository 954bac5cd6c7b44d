"""`tinylm attention` on a tiny saved artifact: the PNG exists and has the size of the grid asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from model.artifact import save_artifact
from model.config import ModelConfig
from model.tokenizers import CharTokenizer
from model.transformer import GPT
from tools.attention_map import main, png_size


@pytest.fixture()
def store(tmp_path, monkeypatch) -> tuple[Path, str]:
    """$TINYLM_HOME with one tiny artifact named 'attn-test' (3 layers, 2 heads); returns (store root, id)."""
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_corpus("To be, or not to be: that is the question.\n")
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=3, n_head=2, n_embd=16, block_size=32))
    root = tmp_path / "home" / "artifacts"
    return root, save_artifact(root, model, tokenizer, name="attn-test", preset="custom")


def _size(png: Path) -> tuple[int, int]:
    height, width = imread(png).shape[:2]
    return width, height


def test_writes_grid_of_selected_layers(store, tmp_path, capsys):
    out = tmp_path / "maps" / "a.png"
    assert main(["attn-test", "--text", "to be or not", "--out", str(out), "--layers", "0,2"]) == 0
    assert out.is_file() and _size(out) == png_size(2, 2, 12)
    assert png_size(2, 2, 12) != png_size(3, 2, 12)
    assert "2 layers x 2 heads, 12 tokens" in capsys.readouterr().out


def test_all_layers_from_an_artifact_path(store, tmp_path):
    root, model_id = store
    out = tmp_path / "b.png"
    assert main([str(root / model_id), "--text", "question: " * 10, "--out", str(out), "--max-tokens", "20"]) == 0
    assert _size(out) == png_size(3, 2, 20)  # the last 20 of 100 tokens


def test_errors(store, tmp_path, capsys):
    assert main(["no-such-model", "--text", "x", "--out", str(tmp_path / "c.png")]) == 1
    assert "no artifact matches" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["attn-test", "--text", "to be", "--layers", "5"])
    assert exit_info.value.code == 2
    assert r"--layers must be comma-separated integers in [0, 3)" in capsys.readouterr().err
