"""The results writer: CSV with a header block, JSON with header and rows, PNG plot; device slugs; git commit."""

import csv
import json
import subprocess
from pathlib import Path

import pytest

from bench_svc.provenance import LOAD_KEYS
from bench_svc.results_io import (
    Anchor,
    Panel,
    PlotSpec,
    cpu_device_name,
    device_slug,
    git_commit,
    make_header,
    read_result,
    write_results,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"n": 1, "fast": 10.0, "slow": 5.0}, {"n": 2, "fast": 20.0, "slow": 6.5}]
PLOT = PlotSpec("demo", x="n", x_label="n", panels=(Panel("value", (("fast", "fast"), ("slow", "slow"))),))


def _header(device="cpu: Test CPU x2"):
    return make_header(
        device, REPO_ROOT, ["python", "-m", "bench_svc.main", "--quick"], Anchor("slow at n=2", 6.5, "ops/s")
    )


def test_writes_csv_json_png_with_the_header_block(tmp_path):
    paths = write_results(tmp_path, "demo", _header(), ROWS, summary={"best": 20.0}, plot=PLOT)
    assert sorted(p.name for p in paths) == [
        "demo-cpu-test-cpu-x2.csv",
        "demo-cpu-test-cpu-x2.json",
        "demo-cpu-test-cpu-x2.png",
    ]

    doc = read_result(tmp_path / "demo-cpu-test-cpu-x2.json")
    header = doc["header"]
    assert set(header) == {"device", "git_commit", "command", "created", "anchor", LOAD_KEYS[0]}
    assert header[LOAD_KEYS[0]] is None or header[LOAD_KEYS[0]] >= 0.0  # the machine's load when the header was made
    assert header["device"] == "cpu: Test CPU x2"
    assert header["command"] == ["python", "-m", "bench_svc.main", "--quick"]
    assert header["anchor"] == {"name": "slow at n=2", "value": 6.5, "unit": "ops/s"}
    assert header["git_commit"] and header["created"][:2] == "20"
    assert doc["rows"] == ROWS and doc["columns"] == ["n", "fast", "slow"]
    assert doc["summary"] == {"best": 20.0} and doc["plot"] == "demo-cpu-test-cpu-x2.png"

    lines = (tmp_path / "demo-cpu-test-cpu-x2.csv").read_text().splitlines()
    comments = [line for line in lines if line.startswith("# ")]
    assert [c.split(":", 1)[0] for c in comments][:5] == [
        "# device",
        "# git_commit",
        "# command",
        "# created",
        "# anchor",
    ]
    assert "# anchor: slow at n=2 = 6.5 ops/s" in comments
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert [float(r["fast"]) for r in table] == [10.0, 20.0]

    png = (tmp_path / "demo-cpu-test-cpu-x2.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_no_png_without_a_plot_and_no_temp_files_left(tmp_path):
    paths = write_results(tmp_path, "plain", _header(), ROWS)
    assert {p.suffix for p in paths} == {".csv", ".json"}
    assert json.loads(paths[1].read_text())["plot"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_rows_must_share_their_columns(tmp_path):
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        write_results(tmp_path, "bad", _header(), [{"a": 1}, {"b": 2}])


def test_device_names_and_slugs():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("cpu: AMD EPYC 7B13 64-Core Processor x2") == "cpu-amd-epyc-7b13-64-core-processor-x2"
    name = cpu_device_name()
    assert name.startswith("cpu: ") and name.rsplit(" x", 1)[1].isdigit()


def test_git_commit_marks_a_dirty_tree(tmp_path):
    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True
        )

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    clean = git_commit(tmp_path)
    assert len(clean) == 40 and "+dirty" not in clean
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path) == clean + "+dirty"
    assert git_commit(tmp_path / "nowhere") == "unknown"
    header = make_header("cpu: x", tmp_path, ["cmd"], Anchor("a"), commit="0123abc")
    assert header.git_commit == "0123abc"  # a run's commit, taken at its start, wins over the tree's now
