"""Suite `export`: PyTorch against ONNX Runtime fp32 / INT8 / INT4 decode latency, by `python -m exporter.bench`.

The exporter owns its benchmark (random-init presets, and the run's artifact too when one is given); this suite runs
it as a child process with the run's output folder and collects the files it writes. Without the exporter's
benchmark in this checkout it says so.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import module_available, run_module
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "export"
MODULE = "exporter.bench"


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the exporter's benchmark; "skipped: ..." when it is not available."""
    if not module_available(MODULE):
        return SuiteResult(NAME, f"skipped: {MODULE} is not available in this checkout")
    args = ["--out-dir", str(ctx.out_dir)]
    if ctx.model_path is not None:
        args += ["--model", str(ctx.model_path)]
    if ctx.quick:
        args.append("--quick")
    return run_module(ctx, NAME, MODULE, args, prefix="export-")
