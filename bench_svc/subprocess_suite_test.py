"""Wrapping another package's benchmark entry point: its files are collected, failures and cancels are reported."""

import dataclasses
import os
import time

import pytest

from bench_svc.subprocess_suite import module_available, run_module
from bench_svc.suite import SuiteCancelled


def test_module_available():
    assert module_available("json.tool") and module_available("bench_svc.kvcache")
    assert not module_available("bench_svc.no_such_suite") and not module_available("no_such_package.bench")


def test_collects_the_files_the_child_wrote_and_forwards_its_output(tiny_ctx, tmp_path):
    src = tmp_path / "payload.txt"
    src.write_text("hello")
    tiny_ctx.out_dir.mkdir(parents=True)
    (tiny_ctx.out_dir / "old.csv").write_text("older")
    old = time.time() - 3600
    os.utime(tiny_ctx.out_dir / "old.csv", (old, old))
    lines = []
    ctx = dataclasses.replace(tiny_ctx, progress=lambda m, f, x: lines.append(m))
    result = run_module(ctx, "zip", "zipfile", ["-c", str(ctx.out_dir / "payload.zip"), str(src)])
    assert result.ok, result.status
    assert [p.name for p in result.files] == ["payload.zip"]  # the older file is not this run's
    result = run_module(ctx, "zip", "zipfile", ["-c", str(ctx.out_dir / "other.zip"), str(src)], prefix="payload")
    assert result.ok and result.files == ()  # written now, but not under the suite's prefix
    assert lines[0].startswith("zip: running ") and "-m zipfile" in lines[0]


def test_a_failing_child_is_reported_with_its_last_lines(tiny_ctx):
    result = run_module(tiny_ctx, "broken", "bench_svc.no_such_suite")
    assert result.status.startswith("failed: bench_svc.no_such_suite exited with 1")
    assert "No module named" in result.status


def test_cancel_stops_the_child(tiny_ctx):
    deadline = time.monotonic() + 1.0
    ctx = dataclasses.replace(tiny_ctx, cancelled=lambda: time.monotonic() > deadline)
    start = time.monotonic()
    with pytest.raises(SuiteCancelled):
        run_module(ctx, "sleepy", "timeit", ["-n", "1", "import time; time.sleep(60)"])
    assert time.monotonic() - start < 15


def test_a_child_past_its_time_limit_fails(tiny_ctx):
    result = run_module(tiny_ctx, "sleepy", "timeit", ["-n", "1", "import time; time.sleep(60)"], timeout_s=1.0)
    assert result.status == "failed: timeit ran past 1 s"
