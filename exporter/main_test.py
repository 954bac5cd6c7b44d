"""`./tinylm export`: exit codes, the table or JSON on stdout, errors that name the problem."""

from __future__ import annotations

import json

import pytest

from exporter.conftest import LLAMA_TINY, TEXT, listing, save_random
from exporter.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main


@pytest.fixture()
def home(tmp_path):
    path = save_random(tmp_path / "home" / "artifacts", LLAMA_TINY, name="cli-model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    return {"TINYLM_HOME": str(tmp_path / "home"), "TINYLM_CORPUS": str(corpus)}, path


def test_export_by_name_prints_json_report(home, capsys):
    env, path = home
    assert main(["cli-model", "--formats", "hf", "--json", "-q"], env) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["model_id"] == path.name and report["passed"] and list(report["variants"]) == ["hf"]
    assert report["reference"]["eval_source"] == "corpus held-out tail"
    assert (path / "hf" / "config.json").is_file()


def test_export_by_folder_with_the_flag_prints_a_table(home, capsys):
    env, path = home
    assert main(["export", "--model", str(path), "--formats", "hf", "-q"], env) == EXIT_OK
    out = capsys.readouterr().out
    assert "hf" in out and "all gates passed" in out


def test_bad_usage_exits_2_and_names_the_problem(home, capsys):
    env, path = home
    before = listing(path)
    assert main(["cli-model", "--formats", "onnx,tflite"], env) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "tflite" in err and "coreml" in err
    assert main(["no-such-model", "--formats", "hf"], env) == EXIT_USAGE
    assert "no artifact matches 'no-such-model'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([], env)
    assert exit_.value.code == EXIT_USAGE
    assert listing(path) == before


def test_corrupt_artifact_exits_1(home, capsys):
    env, path = home
    (path / "model.safetensors").write_bytes(b"x")
    assert main(["cli-model", "--formats", "hf"], env) == EXIT_FAILED
    assert "sha256" in capsys.readouterr().err
