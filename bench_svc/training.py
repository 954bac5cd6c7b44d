"""Suite `training`: training throughput and MFU on a CUDA GPU, by `python -m bench_svc.benches.training`.

The benchmark trains through the trainer's internals; this suite runs it as a child process with the run's output
folder and collects the files it writes. Without a CUDA GPU it is skipped: CPU training figures would say nothing
about the kernels.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_gpu_module
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "training"
MODULE = "bench_svc.benches.training"
QUICK_ARGS = ("--budget-s", "60")  # each variant stops after a minute, target reached or not


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the trainer's GPU benchmark; "skipped: needs CUDA" on a machine without a GPU."""
    args = ["--out", str(ctx.out_dir), *(QUICK_ARGS if ctx.quick else ())]
    return run_gpu_module(ctx, NAME, MODULE, args, "measures tokens/s and MFU", prefix="train-")
