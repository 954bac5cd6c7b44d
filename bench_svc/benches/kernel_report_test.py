"""The results writer (CSV, JSON, PNG, table) on a fake row set; no GPU, no timings."""

import csv
import json

from bench_svc.benches.kernel_report import format_table, write_results
from bench_svc.benches.kernel_timing import BenchResult, Ceilings
from bench_svc.provenance import RunInfo, gpu_slug

CEILINGS = Ceilings(copy_gbps=2950.5, matmul_tflops=712.25)
INFO = RunInfo(
    gpu="NVIDIA H100 80GB HBM3",
    commit="0123456789abcdef",
    command="python -m bench_svc.benches.kernels",
    timestamp="2026-11-23T12:00:00+00:00",
    torch_version="2.11.0",
)


def _rows():
    return [
        BenchResult("swiglu fwd", "65536x2048 bf16", "triton", True, 0.31, None, 2600.0, 0.88, 1.4, None, None),
        BenchResult("swiglu fwd", "65536x2048 bf16", "eager", False, 0.43, None, 1870.0, 0.63, None, None, None),
        BenchResult("linear+ce", "N8192", "chunked", True, 3.1, 610.0, None, 0.86, 0.97, 350.0, 7.2),
        BenchResult("linear+ce", "N8192", "F.cross_entropy", False, 3.0, 630.0, None, 0.88, None, 2520.0, None),
    ]


def test_writes_csv_json_png(tmp_path):
    paths = write_results(_rows(), CEILINGS, INFO, tmp_path / "results", "kernels-" + gpu_slug(INFO.gpu))
    csv_path, json_path, png_path = paths
    assert csv_path.name == "kernels-nvidia-h100-80gb-hbm3.csv"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["triton", "eager", "chunked", "F.cross_entropy"]
    assert float(rows[2]["mem_saving_vs_alt"]) == 7.2 and rows[1]["speedup_vs_best_alt"] == ""
    doc = json.loads(json_path.read_text())
    assert doc["run"]["gpu"] == INFO.gpu and doc["run"]["commit"] == INFO.commit
    assert doc["run"]["command"] == INFO.command and doc["run"]["timestamp"] == INFO.timestamp
    assert doc["ceilings"]["copy_gbps"] == 2950.5 and len(doc["results"]) == 4
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
    assert not [p for p in csv_path.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_table_lists_every_row_and_the_ceilings():
    table = format_table(_rows(), CEILINGS)
    lines = table.splitlines()
    assert "2950 GB/s" in lines[0] or "2951 GB/s" in lines[0]
    assert sum("swiglu fwd" in line for line in lines) == 2
    assert any("triton *" in line and "1.40" in line for line in lines)
    assert any("chunked *" in line and "7.2" in line for line in lines)


def test_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_slug("  ") == "unknown-gpu"
