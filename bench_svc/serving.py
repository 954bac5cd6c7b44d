"""Suite `serving`: the serving engine's decode latency and throughput, streaming gRPC under load and Hugging Face
`generate` as the baseline, by `python -m bench_svc.benches.inference_serving`.

The benchmark drives the inference service's engine directly (and starts its server), so this suite runs it as a
child process with the run's device, threads and output folder, and collects its inference-<cpu|gpu>.* files.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_module, thread_args
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "serving"
MODULE = "bench_svc.benches.inference_serving"
QUICK_ARGS = ("--skip", "grpc,hf")  # the engine rows only


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the serving benchmark on the run's device (a random-init shakespeare-char unless a model is given)."""
    args = ["--device", ctx.device, "--out", str(ctx.out_dir), *thread_args(ctx)]
    if ctx.model_path is not None:
        args += ["--model", str(ctx.model_path)]
    return run_module(ctx, NAME, MODULE, [*args, *(QUICK_ARGS if ctx.quick else ())], prefix="inference-")
