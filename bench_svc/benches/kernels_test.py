"""The benchmark entry point: every registered module gives cases without touching a GPU; without CUDA the
command exits non-zero and says why."""

import csv
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_svc.benches import kernels as bench
from bench_svc.benches.kernel_timing import Ceilings, Measurement
from bench_svc.benches.kernels import BENCH_MODULES, MODULE, NO_GPU_EXIT_CODE, main
from kernels.bench_common import BenchCase

REPO_ROOT = Path(__file__).absolute().parents[2]


def test_every_registered_module_gives_cases():
    for name in BENCH_MODULES:
        cases = importlib.import_module(name).bench_cases()
        assert cases, f"{name}.bench_cases() returned nothing"
        assert all(isinstance(c, BenchCase) for c in cases)
        groups = {(c.kernel, c.shape) for c in cases}
        for group in groups:  # every measured shape has ours and at least one alternative beside it
            impls = [c for c in cases if (c.kernel, c.shape) == group]
            assert any(c.ours for c in impls) and any(not c.ours for c in impls), (name, group)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_main_without_gpu_says_it_needs_one(capsys, tmp_path):
    assert main(["--out-dir", str(tmp_path)]) == NO_GPU_EXIT_CODE
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_module_entry_point_exits_non_zero():
    proc = subprocess.run([sys.executable, "-m", MODULE], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == NO_GPU_EXIT_CODE
    assert "needs a CUDA GPU" in proc.stderr


def test_main_end_to_end_with_stand_in_timings(monkeypatch, tmp_path, capsys):
    """The whole run on CPU with the GPU parts replaced: cases collected, measured, written, table printed last."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Stand-in GPU 80GB")
    monkeypatch.setattr(bench, "measure_ceilings", lambda: Ceilings(copy_gbps=3000.0, matmul_tflops=700.0))
    monkeypatch.setattr(bench, "warm_compile_caches", lambda jobs, workers: 0)
    monkeypatch.setattr(bench, "measure", lambda case: Measurement(ms=1.0 if case.ours else 1.5))
    monkeypatch.setattr(bench, "BENCH_MODULES", ("kernels.swiglu_bench",))
    assert main(["--out-dir", str(tmp_path), "--only", "swiglu fwd+bwd"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    stem = "kernels-stand-in-gpu-80gb-swiglu-fwd-bwd"  # a partial run never overwrites the whole run's files
    assert names == [f"{stem}.csv", f"{stem}.json", f"{stem}.png"]
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("* ours")
    ours = [line for line in out if "triton *" in line]
    assert len(ours) == 1 and "swiglu fwd+bwd" in ours[0] and " 1.50 " in ours[0]


def test_a_failing_module_keeps_what_earlier_modules_measured(monkeypatch, tmp_path):
    """Results are written after each module: a case that raises in a later module loses neither the earlier rows
    nor the exit status (non-zero)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Stand-in GPU")
    monkeypatch.setattr(bench, "measure_ceilings", lambda: Ceilings(copy_gbps=3000.0, matmul_tflops=700.0))
    monkeypatch.setattr(bench, "warm_compile_caches", lambda jobs, workers: 0)

    def measure(case):
        if case.kernel.startswith("fused_ffn"):
            raise RuntimeError("planted failure")
        return Measurement(ms=1.0)

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "BENCH_MODULES", ("kernels.swiglu_bench", "kernels.fused_ffn_bench"))
    assert main(["--out-dir", str(tmp_path)]) == 1
    rows = (tmp_path / "kernels-stand-in-gpu.csv").read_text()
    assert "swiglu fwd+bwd" in rows and "fused_ffn" not in rows


def test_only_matching_nothing_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Stand-in GPU")
    assert main(["--out-dir", str(tmp_path), "--only", "no-such-kernel"]) == NO_GPU_EXIT_CODE
    assert "no-such-kernel" in capsys.readouterr().err and not list(tmp_path.iterdir())


class _Killed(BaseException):
    """Stands in for the time limit's kill: not an Exception, so the run does not go on past it."""


def test_rows_are_on_disk_as_they_are_measured(monkeypatch, tmp_path):
    """A run killed part-way (a time limit) leaves the rows measured so far in the CSV, each shape's alternatives
    ahead of ours, so our row already carries its speed-up."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Stand-in GPU")
    monkeypatch.setattr(bench, "measure_ceilings", lambda: Ceilings(copy_gbps=3000.0, matmul_tflops=700.0))
    monkeypatch.setattr(bench, "warm_compile_caches", lambda jobs, workers: 0)
    measured = []

    def measure(case):
        if len(measured) == 3:
            raise _Killed
        measured.append(case)
        return Measurement(ms=1.0 if case.ours else 2.0)

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "BENCH_MODULES", ("kernels.swiglu_bench",))
    with pytest.raises(_Killed):
        main(["--out-dir", str(tmp_path)])
    with (tmp_path / "kernels-stand-in-gpu.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["kernel"], r["shape"], r["impl"]) for r in rows] == [(c.kernel, c.shape, c.impl) for c in measured]
    assert [r["ours"] for r in rows] == ["False", "False", "True"]  # swiglu fwd: eager, torch.compile, then ours
    assert float(rows[2]["speedup_vs_best_alt"]) == 2.0 and rows[0]["speedup_vs_best_alt"] == ""


def test_alternatives_first_keeps_the_groups_in_order():
    def case(kernel, shape, impl, ours):
        return BenchCase(kernel, shape, impl, ours, setup=lambda: lambda: None)

    cases = [case("k", "a", "ours", True), case("k", "a", "alt", False), case("k", "b", "ours", True)]
    cases.append(case("k", "b", "alt", False))
    got = [(c.shape, c.impl) for c in bench._alternatives_first(cases)]
    assert got == [("a", "alt"), ("a", "ours"), ("b", "alt"), ("b", "ours")]


def test_warm_up_gets_our_selected_cases_first_of_each_kind_first(monkeypatch, tmp_path):
    """The compile warm-up runs before the ceilings, over our cases only (as --only selects them), one case of each
    (kernel, impl) ahead of the rest; --warm-workers 0 skips it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Stand-in GPU")
    order = []
    monkeypatch.setattr(bench, "warm_compile_caches", lambda jobs, workers: order.append(("warm", jobs, workers)))
    ceilings = Ceilings(copy_gbps=3000.0, matmul_tflops=700.0)
    monkeypatch.setattr(bench, "measure_ceilings", lambda: order.append("ceilings") or ceilings)
    monkeypatch.setattr(bench, "measure", lambda case: Measurement(ms=1.0))
    monkeypatch.setattr(bench, "BENCH_MODULES", ("kernels.swiglu_bench", "kernels.inference_bench"))
    assert main(["--out-dir", str(tmp_path), "--only", "swiglu,wo_matmul", "--warm-workers", "3"]) == 0
    (_, jobs, workers), then = order
    assert workers == 3 and then == "ceilings"
    cases = {name: importlib.import_module(name).bench_cases() for name in bench.BENCH_MODULES}
    picked = [cases[name][i] for name, i in jobs]
    assert all(c.ours and c.kernel in ("swiglu fwd", "swiglu fwd+bwd", "wo_matmul") for c in picked)
    want = sum(
        c.ours and c.kernel in ("swiglu fwd", "swiglu fwd+bwd", "wo_matmul") for cs in cases.values() for c in cs
    )
    assert len(jobs) == len(set(jobs)) == want
    kinds = [(c.kernel, c.impl, c.shape.split()[0]) for c in picked]
    n_kinds = len(set(kinds))
    assert len(set(kinds[:n_kinds])) == n_kinds  # each kind once, then the rest

    order.clear()
    assert main(["--out-dir", str(tmp_path), "--only", "swiglu", "--warm-workers", "0"]) == 0
    assert order == ["ceilings"]
