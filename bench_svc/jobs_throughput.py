"""Suite `jobs`: job-queue throughput (no-op jobs/s with 1 and 4 workers), by `python -m bench_svc.benches.jobs_queue`.

This suite runs the queue benchmark as a child process (worker processes fork from it) against a throwaway local
Redis (so it measures the queue, never loads a live one) with the run's output folder, and collects its files.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_module
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "jobs"
MODULE = "bench_svc.benches.jobs_queue"
QUICK_ARGS = ("--jobs", "300", "--repeats", "1")


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the queue benchmark."""
    args = ["--out", str(ctx.out_dir), *(QUICK_ARGS if ctx.quick else ())]
    return run_module(ctx, NAME, MODULE, args, prefix="jobs-")
