"""The compile warm-up's plumbing on a CPU machine: its workers start, report what failed, and are stopped."""

import logging

from bench_svc.benches import kernel_warmup
from bench_svc.benches.kernel_warmup import default_workers, warm_compile_caches, warm_one


def test_nothing_to_do_without_workers_or_jobs():
    assert warm_compile_caches([("kernels.swiglu_bench", 0)], 0) == 0
    assert warm_compile_caches([], 4) == 0


def test_default_workers_is_half_the_cores_at_most_eight(monkeypatch):
    for cores, want in ((None, 1), (2, 1), (16, 8), (64, 8), (6, 3)):
        monkeypatch.setattr(kernel_warmup.os, "cpu_count", lambda cores=cores: cores)
        assert default_workers() == want


def test_a_case_that_fails_is_reported_not_raised():
    assert warm_one(("kernels.swiglu_bench", 0)) is not None  # its setup allocates on CUDA: no GPU here
    assert "IndexError" in warm_one(("kernels.swiglu_bench", 10_000))


def test_workers_run_in_spawned_processes_and_their_failures_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="bench_svc.benches.kernels"):
        assert warm_compile_caches([("kernels.swiglu_bench", 10_000)], 2, timeout_s=120) == 0
    assert "compile warm-up: kernels.swiglu_bench case 10000: IndexError" in caplog.text


def test_a_warm_up_past_its_time_is_stopped(caplog):
    with caplog.at_level(logging.WARNING, logger="bench_svc.benches.kernels"):
        assert warm_compile_caches([("kernels.swiglu_bench", 0)], 1, timeout_s=0.01) == 0
    assert "not done after" in caplog.text
