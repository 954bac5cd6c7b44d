"""The checkpointing benchmark: its in-process measurement, and the whole run writing CSV, JSON and PNG."""

import csv
import json

import pytest

from bench_svc.benches import train_checkpointing
from trainer.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # as the trainer's own tests run


def test_checkpointing_lowers_the_measured_peak():
    base = load_config("tiny").replace(device="cpu", batch_size=8, block_size=64, dtype="float32")
    off = train_checkpointing.measure_step(base, 256, timed_steps=1)
    on = train_checkpointing.measure_step(base.replace(grad_checkpointing=True), 256, timed_steps=1)
    assert (off["variant"], on["variant"]) == ("off", "on")
    assert off["persistent_bytes"] == on["persistent_bytes"] > 0  # weights, AdamW state and batch: the same
    assert 0 < on["step_peak_bytes"] < off["step_peak_bytes"]
    assert off["peak_bytes"] == off["persistent_bytes"] + off["step_peak_bytes"]
    assert on["step_s"] > 0 and off["max_rss_bytes"] > 0


def test_main_writes_results(tmp_path, capsys):
    out = tmp_path / "results"
    argv = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--timed-steps",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert train_checkpointing.main(argv) == 0
    rows = list(csv.DictReader((out / "checkpointing-cpu.csv").open()))
    assert [r["variant"] for r in rows] == ["off", "on"]
    assert all(r["device"].startswith("cpu") and r["commit"] and r["command"].endswith(str(out)) for r in rows)
    assert int(rows[1]["peak_bytes"]) < int(rows[0]["peak_bytes"])
    doc = json.loads((out / "checkpointing-cpu.json").read_text())
    assert doc["peak_ratio_on_off"] < 1.0 and doc["info"]["torch_version"]
    assert (out / "checkpointing-cpu.png").stat().st_size > 1000
    assert "peak memory on/off" in capsys.readouterr().out
