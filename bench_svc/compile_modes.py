"""Suite `compile`: torch.compile modes for training (steps/s after warm-up and compile time, eager as the anchor),
by `python -m bench_svc.benches.train_compile`.

The benchmark trains through the trainer (each mode in a process of its own, cold compiler caches); this suite
runs it as a child process with the run's device, threads and output folder, and collects its compile-modes-* files.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_module, thread_args
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "compile"
MODULE = "bench_svc.benches.train_compile"
ARGS = ("--timeout-s", "200")  # the README's figure: a mode that compiles longer than this is reported as such
QUICK_ARGS = ("--modes", "none,default", "--warmup-steps", "1", "--steps", "5")


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the compile-modes benchmark."""
    args = ["--device", ctx.device, "--out", str(ctx.out_dir), *ARGS, *thread_args(ctx)]
    return run_module(ctx, NAME, MODULE, [*args, *(QUICK_ARGS if ctx.quick else ())], prefix="compile-modes-")
