"""The CPU decode benchmark writes its CSV/JSON/PNG with the harness's header; every engine and batch gets a row."""

from __future__ import annotations

import csv
import json

from bench_svc.benches.export_decode import BATCHES, ENGINES, MODULE, main


def test_bench_writes_rows_for_every_engine_and_batch(tmp_path, capsys):
    assert main(["--presets", "tiny", "--steps", "2", "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "export-cpu.json").read_text())
    header, summary = result["header"], result["summary"]
    assert header["device"].startswith("cpu: ") and summary["threads"] == 1
    assert header["command"][1:] == [
        "-m",
        MODULE,
        "--presets",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--out-dir",
        str(tmp_path),
    ]
    assert "random init" in summary["weights"] and header["git_commit"]
    rows = result["rows"]
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in ENGINES for b in BATCHES}
    assert all(0 < r["p50_ms"] <= r["p95_ms"] for r in rows)
    assert all(r["speedup_vs_torch_p50"] == 1.0 for r in rows if r["engine"] == "torch-eager")
    lines = (tmp_path / "export-cpu.csv").read_text().splitlines()
    assert lines[0].startswith("# device: cpu: ")
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(table) == len(rows) and table[0]["engine"] == "torch-eager"
    assert (tmp_path / "export-cpu.png").read_bytes()[:4] == b"\x89PNG"
