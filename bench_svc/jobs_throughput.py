"""Suite `jobs`: job-queue throughput (no-op jobs/s with 1 and 4 workers), by the queue's own `python -m jobs.bench`.

The queue package owns its benchmark; this suite runs it as a child process against a throwaway local Redis (so
it measures the queue, never loads a live one) with the run's output folder, and collects the files it writes.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import module_available, run_module
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "jobs"
MODULE = "jobs.bench"
QUICK_ARGS = ("--jobs", "300", "--repeats", "1")


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the queue benchmark; "skipped: ..." when it is not available."""
    if not module_available(MODULE):
        return SuiteResult(NAME, f"skipped: {MODULE} is not available in this checkout")
    args = ["--out", str(ctx.out_dir), *(QUICK_ARGS if ctx.quick else ())]
    return run_module(ctx, NAME, MODULE, args, prefix="jobs-")
