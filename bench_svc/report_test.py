"""report.md gathers every result JSON of a folder: header tables, key figures, rows and plot links."""

import json

from bench_svc.report import REPORT_NAME, gather, write_report
from bench_svc.results_io import Anchor, Panel, PlotSpec, RunHeader, write_results

HEADER = RunHeader(
    device="cpu: Test CPU x2",
    git_commit="abc123def456+dirty",
    command=("./tinylm", "bench", "--quick"),
    created="2026-11-23T12:00:00+00:00",
    anchor=Anchor("no KV cache at 128", 237.0, "tokens/s"),
)


def test_report_gathers_our_results_and_a_foreign_one(tmp_path):
    plot = PlotSpec("kv", x="context_len", x_label="ctx", panels=(Panel("tok/s", (("cached", "cached"),)),))
    write_results(
        tmp_path, "kvcache", HEADER, [{"context_len": 16, "cached": 700.5}], summary={"speedup": 1.86}, plot=plot
    )
    write_results(
        tmp_path,
        "summary",
        HEADER,
        [{"suite": "kvcache", "status": "ok"}, {"suite": "kernels", "status": "skipped: needs CUDA"}],
    )
    # the kernels benchmark writes its own layout: a `run` block and `results`.
    (tmp_path / "kernels-nvidia-h100.json").write_text(
        json.dumps(
            {
                "run": {
                    "gpu": "NVIDIA H100 80GB HBM3",
                    "commit": "fedcba987654",
                    "command": "python -m kernels.bench",
                    "timestamp": "2026-11-23T10:00:00Z",
                },
                "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": 750.0},
                "results": [{"kernel": "rmsnorm", "ms": 0.01}],
            }
        )
    )
    (tmp_path / "broken.json").write_text("{not json")

    path = write_report(tmp_path)
    assert path == tmp_path / REPORT_NAME
    text = path.read_text()
    # summary first, then the suites in registry order (kvcache before kernels)
    assert text.index("## summary") < text.index("## kvcache") < text.index("## kernels")
    for expected in (
        "cpu: Test CPU x2",
        "abc123def456+dirty",
        "./tinylm bench --quick",
        "no KV cache at 128 = 237 tokens/s",
        "speedup **1.86**",
        "| 16 | 700.5 |",
        "![kvcache](kvcache-cpu-test-cpu-x2.png)",
        "skipped: needs CUDA",
        "NVIDIA H100 80GB HBM3",
        "fedcba987654",
        "python -m kernels.bench",
        "copy_gbps 3000",
        "rmsnorm",
    ):
        assert expected in text, expected
    assert "broken" not in text
    assert [d.suite for d in gather(tmp_path)] == ["summary", "kvcache", "kernels"]


def test_an_empty_folder_says_so(tmp_path):
    assert "No results yet." in write_report(tmp_path / "new").read_text()


def test_trainer_info_header_is_read_and_curves_stay_out_of_tables(tmp_path):
    doc = {
        "info": {
            "gpu": "Stand-in GPU",
            "commit": "abc",
            "command": "python -m bench_svc.benches.training",
            "timestamp": "2026",
        },
        "results": [{"variant": "eager", "steps": 10, "curve": [{"step": 5, "val_loss": 2.0}]}],
    }
    (tmp_path / "train-stand-in.json").write_text(json.dumps(doc))
    text = (write_report(tmp_path)).read_text()
    assert "| Stand-in GPU | abc | python -m bench_svc.benches.training | 2026 |" in text
    assert "| variant | steps |" in text and "val_loss" not in text
