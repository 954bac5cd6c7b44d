"""Kept only until trainer/ moves over: `RunInfo` and `gpu_slug` now live in `bench_svc.provenance`, the kernel
results writer in `bench_svc.benches.kernel_report` (issue 19: no library package writes result files).
Re-exports, defines nothing.

Still imported by: trainer/bench.py, trainer/bench_output.py (RunInfo, gpu_slug), trainer/compile_bench.py,
trainer/checkpointing_bench.py (RunInfo). Delete this file when they import `bench_svc.provenance`.
"""

from bench_svc.provenance import RunInfo, gpu_slug

__all__ = ["RunInfo", "gpu_slug"]
