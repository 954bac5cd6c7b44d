"""The speculative-decoding benchmark end to end on CPU with two briefly trained models: every mode and k gets a
row, greedy rows match the target's tokens, and the header carries the harness's provenance."""

from __future__ import annotations

import json

from bench_svc.benches.speculative import MODULE, main

SPEECH = "FIRST CITIZEN:\nbefore we proceed any further, hear me speak.\n\n"


def test_writes_rows_for_every_mode_and_k_with_the_provenance_header(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SPEECH * 60)
    code = main(
        [
            "--corpus",
            str(corpus),
            "--target-steps",
            "2",
            "--draft-steps",
            "2",
            "--batch",
            "2",
            "--seq",
            "32",
            "--k",
            "1,2",
            "--prompts",
            "1",
            "--max-new-tokens",
            "4",
            "--repeats",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "out" / "speculative-cpu.json").read_text())
    assert {(r["mode"], r["k"]) for r in doc["rows"]} == {(m, k) for m in ("greedy", "sample") for k in (0, 1, 2)}
    assert all(r["same_tokens_as_target"] is True for r in doc["rows"] if r["mode"] == "greedy" and r["k"])
    header = doc["header"]
    assert header["device"].startswith("cpu: ") and header["git_commit"] and MODULE in header["command"]
    assert header["created"][:2] == "20" and "target alone" in header["anchor"]
    assert (tmp_path / "out" / "speculative-cpu.png").stat().st_size > 0
    assert capsys.readouterr().out.strip().splitlines()[0].startswith("series")
