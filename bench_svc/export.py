"""Suite `export`: PyTorch against ONNX Runtime fp32 / INT8 / INT4 decode latency, by
`python -m bench_svc.benches.export_decode`.

The benchmark (random-init presets, and the run's artifact too when one is given) imports the exporter's internals,
so this suite runs it as a child process with the run's output folder and collects the files it writes.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_module
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "export"
MODULE = "bench_svc.benches.export_decode"


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the export decode benchmark."""
    args = ["--out-dir", str(ctx.out_dir)]
    if ctx.model_path is not None:
        args += ["--model", str(ctx.model_path)]
    if ctx.quick:
        args.append("--quick")
    return run_module(ctx, NAME, MODULE, args, prefix="export-")
