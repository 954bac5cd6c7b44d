"""The compile-modes benchmark: argument checks, and a run of the eager anchor writing CSV, JSON and PNG."""

import csv
import json

import pytest

from bench_svc.benches import train_compile
from trainer.testing import write_small_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # as the trainer's own tests run


@pytest.mark.parametrize("modes", ["fast", "default,turbo", ""])
def test_bad_modes_are_refused(modes, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_compile.main(["--modes", modes])
    assert exit_.value.code == 2
    assert (
        "--modes must be a comma-separated list of ['none', 'default', 'reduce-overhead', 'reduce-overhead-tuned', 'max-autotune']"
        in (capsys.readouterr().err)
    )


def test_eager_anchor_run_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_CORPUS", str(write_small_corpus(tmp_path / "c.txt")))
    out = tmp_path / "results"
    argv = ["--modes", "none", "--device", "cpu", "--batch-size", "2", "--block-size", "32", "--warmup-steps", "1",
            "--steps", "3", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert train_compile.main(argv) == 0
    first, row = csv.DictReader((out / "compile-modes-cpu.csv").open())  # eager first and last
    assert first["mode"] == "none" and (first["order"], row["order"]) == ("1", "2")
    assert row["mode"] == "none" and row["status"] == "ok" and row["preset"] == "tiny"
    mean = (float(first["step_s"]) + float(row["step_s"])) / 2
    assert float(row["speedup_vs_eager"]) == pytest.approx(mean / float(row["step_s"]))
    assert float(row["compile_s"]) == 0.0
    assert float(row["steps_per_s"]) == pytest.approx(1.0 / float(row["step_s"]))
    assert row["command"].endswith("--out " + str(out)) and row["commit"]
    doc = json.loads((out / "compile-modes-cpu.json").read_text())
    result = doc["results"][1]
    assert len(result["step_times_s"]) == 4 and result["threads"] == 1 and result["graphs"] == 0
    assert (out / "compile-modes-cpu.png").stat().st_size > 1000
    assert "none" in capsys.readouterr().out
