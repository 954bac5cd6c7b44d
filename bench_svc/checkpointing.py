"""Suite `checkpointing`: gradient checkpointing's trade (peak memory and step time of a shakespeare-char training
step, off and on), by `python -m bench_svc.benches.train_checkpointing`.

The benchmark builds the trainer's model and optimizer (each variant in a process of its own: a fresh allocator and
peak RSS); this suite runs it as a child process with the run's device, threads and output folder, and collects its
checkpointing-* files.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_module, thread_args
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "checkpointing"
MODULE = "bench_svc.benches.train_checkpointing"
ARGS = ("--timed-steps", "3")  # the README's figure
QUICK_ARGS = ("--batch-size", "2", "--timed-steps", "1")


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the gradient-checkpointing benchmark."""
    args = ["--device", ctx.device, "--out", str(ctx.out_dir), *thread_args(ctx)]
    return run_module(ctx, NAME, MODULE, [*args, *(QUICK_ARGS if ctx.quick else ARGS)], prefix="checkpointing-")
