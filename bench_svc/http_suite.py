"""Suite `http`: what the OpenAI-compatible HTTP API costs next to gRPC on one inference server, by
`python -m bench_svc.http_overhead`.

The benchmark starts its own server and clients; this suite runs it as a child process with the run's threads (the
server's) and output folder, and collects its http-overhead-* files.
"""

from __future__ import annotations

from bench_svc.subprocess_suite import run_module, thread_args
from bench_svc.suite import SuiteContext, SuiteResult

__all__ = ["NAME", "run"]

NAME = "http"
MODULE = "bench_svc.http_overhead"
QUICK_ARGS = ("--concurrency", "1", "--rounds", "1", "--max-new-tokens", "16")


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs the HTTP-vs-gRPC benchmark (CPU: the server is torch on the CPU)."""
    args = ["--out", str(ctx.out_dir), *thread_args(ctx), *(QUICK_ARGS if ctx.quick else ())]
    return run_module(ctx, NAME, MODULE, args, prefix="http-overhead-")
