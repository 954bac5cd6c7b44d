"""A run of several suites: GPU suites say they need CUDA on a CPU machine, and report.md shows every suite."""

import dataclasses

import pytest
import torch

from bench_svc.registry import DEFAULT_SUITES, SUITES, needing_a_model, parse_suites
from bench_svc.results_io import read_result
from bench_svc.runner import run_suites
from bench_svc.suite import SuiteCancelled


def test_parse_suites_orders_dedupes_and_defaults():
    assert parse_suites(["memory", "kvcache", "memory"]) == ["kvcache", "memory"]
    assert parse_suites([]) == parse_suites([""]) == list(DEFAULT_SUITES)
    with pytest.raises(ValueError) as err:
        parse_suites(["kvcache", "warp-drive"])
    assert "warp-drive" in str(err.value) and all(name in str(err.value) for name in SUITES)


def test_which_suites_need_a_model():
    assert needing_a_model(["kvcache", "memory", "kernels", "export"]) == []
    assert needing_a_model(["export", "inference"]) == ["inference"]
    assert needing_a_model(["inference"], inference_address="127.0.0.1:5") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU reports")
def test_gpu_suites_are_skipped_on_cpu_and_the_report_shows_every_suite(tiny_ctx):
    messages = []
    ctx = dataclasses.replace(tiny_ctx, progress=lambda m, f, x: messages.append((m, f)))
    outcome = run_suites(["memory", "kernels", "training"], ctx)

    status = {r.suite: r.status for r in outcome.results}
    assert status["memory"] == "ok"
    assert status["kernels"].startswith("skipped: needs CUDA") and status["training"].startswith("skipped: needs CUDA")
    assert outcome.results[1].files == () and outcome.device.startswith("cpu: ")

    summary = read_result(next(f for f in outcome.files if f.name.startswith("summary-") and f.suffix == ".json"))
    assert [r["suite"] for r in summary["rows"]] == ["memory", "kernels", "training"]
    memory = read_result(next(f for f in outcome.files if f.name.startswith("memory-") and f.suffix == ".json"))
    assert memory["header"]["git_commit"] == summary["header"]["git_commit"] == outcome.commit  # taken once per run
    text = outcome.report.read_text()
    assert "## memory" in text and "skipped: needs CUDA" in text and outcome.commit in text
    assert outcome.report in outcome.files
    fractions = [f for _, f in messages if f >= 0]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_cancelled_run_stops(tiny_ctx):
    with pytest.raises(SuiteCancelled):
        run_suites(["memory"], dataclasses.replace(tiny_ctx, cancelled=lambda: True))


def test_the_job_queue_knows_the_same_suites():
    """Services check nested bench specs (then_bench) against jobs.spec_checks.BENCH_SUITES at submit."""
    from jobs.spec_checks import BENCH_SUITES

    assert BENCH_SUITES == tuple(SUITES)


CHILD_SUITES = {  # suite -> the program it runs in a child process (the README's reproduce column names the suite)
    "serving": "bench_svc.benches.inference_serving",
    "http": "bench_svc.http_overhead",
    "speculative": "bench_svc.benches.speculative",
    "compile": "bench_svc.benches.train_compile",
    "checkpointing": "bench_svc.benches.train_checkpointing",
}


@pytest.mark.parametrize("name", sorted(CHILD_SUITES))
def test_a_child_process_suite_runs_its_program_with_the_runs_threads_and_folder(name, tiny_ctx, monkeypatch):
    from bench_svc.registry import load_suite
    from bench_svc.subprocess_suite import module_available
    from bench_svc.suite import SuiteResult

    suite = load_suite(name)
    calls = []
    monkeypatch.setattr(suite, "run_module", lambda ctx, s, module, args, **kw: calls.append((s, module, args)) or
                        SuiteResult(s, "ok"))  # fmt: skip
    for quick in (False, True):
        assert suite.run(dataclasses.replace(tiny_ctx, threads=2, quick=quick)).ok
    assert suite.NAME == name and all(s == name and m == CHILD_SUITES[name] for s, m, _ in calls)
    assert module_available(CHILD_SUITES[name])
    (_, _, full), (_, _, quick_args) = calls
    for args in (full, quick_args):
        assert str(tiny_ctx.out_dir) in args and args[args.index("--threads") + 1] == "2"
    assert full != quick_args  # --quick makes it shorter
    suite.run(tiny_ctx)  # threads 0: the program's own default
    assert "--threads" not in calls[-1][2]
