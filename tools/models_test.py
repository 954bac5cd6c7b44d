"""`./tinylm models` lists, shows and removes real artifacts in a store, and names a missing one clearly."""

import json

import pytest
import torch

from model.artifact import save_artifact
from model.presets import get_preset
from model.tokenizers import ByteTokenizer
from model.transformer import GPT
from tools import models


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", n_layer=1, n_embd=32, n_head=2, n_kv_head=1, vocab_size=256, block_size=16))
    model_id = save_artifact(
        tmp_path / "artifacts", model, ByteTokenizer(), name="unit", preset="tiny", metrics={"val_loss": 3.5}
    )
    return model_id


def test_list_show_rm(store, capsys):
    assert models.main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in listed] == [store] and listed[0]["val_loss"] == 3.5
    assert models.main(["show", store[:8]]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "unit" and shown["path"].endswith(store)
    assert models.main(["rm", "unit"]) == 0
    assert store in capsys.readouterr().out
    assert models.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_missing_model_is_an_error_naming_it(store, capsys):
    assert models.main(["show", "nosuchmodel"]) == 1
    assert "nosuchmodel" in capsys.readouterr().err
