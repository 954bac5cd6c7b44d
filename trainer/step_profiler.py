"""`tinylm train --profile N`: a torch.profiler trace of N training steps, after a couple of unrecorded ones.

The first step (compilation, allocator growth) is skipped and the second warms the profiler up; the next N are
recorded (CPU ops, CUDA kernels on a GPU, shapes, memory). The trace goes to `<out_dir>/<worker>.<ns>.pt.trace.json`
through `tensorboard_trace_handler`: Chrome trace JSON, which chrome://tracing and https://ui.perfetto.dev open,
and which TensorBoard's profiler plugin (torch-tb-profiler) reads with `tensorboard --logdir <out_dir>`. A table
of the most expensive ops sits beside it in `<worker>.summary.txt`. A run shorter than the schedule still writes
what it recorded.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

__all__ = ["SKIPPED_STEPS", "WARMUP_STEPS", "StepProfiler"]

SKIPPED_STEPS = 1  # not profiled at all: compilation and first-touch allocations
WARMUP_STEPS = 1  # profiled and thrown away: the profiler's own start-up cost
SUMMARY_ROWS = 30


class StepProfiler:
    """Context manager around the training loop; call `step()` after every optimizer step."""

    def __init__(self, out_dir: Path, steps: int, *, device: torch.device, worker_name: str = "rank0") -> None:
        assert steps >= 1, f"steps must be >= 1, got {steps}"
        self.out_dir, self.steps, self.worker_name = Path(out_dir), steps, worker_name
        self.trace: Path | None = None  # the trace file, once written
        self.summary: Path | None = None
        self.recorded_steps = 0
        self._seen = 0
        self._cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=SKIPPED_STEPS, warmup=WARMUP_STEPS, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=True,
        )

    def __enter__(self) -> "StepProfiler":
        self._prof.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._prof.__exit__(exc_type, exc, tb)

    def step(self) -> None:
        """Mark the end of one training step."""
        self._seen += 1
        self._prof.step()

    def _write(self, prof: profile) -> None:
        self.recorded_steps = min(self.steps, max(0, self._seen - SKIPPED_STEPS - WARMUP_STEPS))
        before = set(self.out_dir.glob(f"{self.worker_name}.*.pt.trace.json"))
        tensorboard_trace_handler(str(self.out_dir), worker_name=self.worker_name)(prof)
        written = set(self.out_dir.glob(f"{self.worker_name}.*.pt.trace.json")) - before
        self.trace = max(written, key=lambda p: p.stat().st_mtime_ns) if written else None
        sort_by = "self_device_time_total" if self._cuda else "self_cpu_time_total"
        self.summary = self.out_dir / f"{self.worker_name}.summary.txt"
        self.summary.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=SUMMARY_ROWS) + "\n")
