"""Suite `speculative`: speculative decoding at batch 1 (a `tiny` draft for a `shakespeare-char` target, both first
trained on $TINYLM_CORPUS), by `python -m bench_svc.benches.speculative`.

The benchmark trains and decodes through the model library; this suite runs it as a child process with the run's
device, threads and output folder, and collects its speculative-<device type>.* files.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_module, thread_args
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "speculative"
MODULE = "bench_svc.benches.speculative"
QUICK_ARGS = ("--target-steps", "20", "--draft-steps", "10", "--k", "2", "--max-new-tokens", "16", "--repeats", "1")


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the speculative-decoding benchmark (its defaults: the README's figure)."""
    args = ["--device", ctx.device, "--out-dir", str(ctx.out_dir), *thread_args(ctx)]
    return run_module(ctx, NAME, MODULE, [*args, *(QUICK_ARGS if ctx.quick else ())], prefix="speculative-")
