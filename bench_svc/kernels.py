"""Suite `kernels`: every kernel against its PyTorch alternatives, by `python -m bench_svc.benches.kernels` on a CUDA GPU.

The kernels package owns its benchmark (ceilings, cases, fraction of peak); this suite runs it as a child process
with the run's output folder and collects its kernels-<gpu>.{csv,json,png}. Without a CUDA GPU it is skipped.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_gpu_module
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "kernels"
MODULE = "bench_svc.benches.kernels"


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the kernels benchmark on the GPU; "skipped: needs CUDA" on a machine without one."""
    return run_gpu_module(
        ctx, NAME, MODULE, ["--out-dir", str(ctx.out_dir)], "times Triton/CUDA kernels", prefix="kernels-"
    )
