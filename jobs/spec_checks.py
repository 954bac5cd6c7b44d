"""Checks of the job specs one job enqueues for the next (TrainSpec.then_export, ExportSpec.then_bench), done at
submit by whichever service takes the outer spec, so that a bad nested value is refused at once, naming its
field, instead of failing a child job hours later. Services never import each other; the names they check live
here, beside the queue they all share (bench_svc's registry is tested to match)."""

from __future__ import annotations

from protos import jobs_pb2

__all__ = ["BENCH_SUITES", "NestedSpecError", "check_bench_spec"]

# The suites bench_svc.registry.SUITES knows, in its order (bench_svc/runner_test.py checks they agree).
BENCH_SUITES: tuple[str, ...] = (
    "kvcache", "memory", "inference", "serving", "http", "export", "jobs", "speculative", "compile", "checkpointing",
    "kernels", "training",
)  # fmt: skip


class NestedSpecError(ValueError):
    """A nested spec field is invalid; `field` is its full path (`then_export.then_bench.suites[0]`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def check_bench_spec(spec: jobs_pb2.BenchSpec, prefix: str) -> None:
    """Raise NestedSpecError naming `prefix` + the field for a bench spec its worker would refuse."""
    for index, name in enumerate(spec.suites):
        if name.strip() and name.strip() not in BENCH_SUITES:
            raise NestedSpecError(f"{prefix}suites[{index}]", f"must be one of {list(BENCH_SUITES)}, got {name!r}")
