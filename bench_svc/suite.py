"""What every benchmark suite is given and gives back.

A suite is a module with `NAME` and `run(ctx: SuiteContext) -> SuiteResult`. It reports progress through
`ctx.progress(message, fraction, metrics)` (a CLI prints it, the queue worker turns it into job events) and
stops early when `ctx.cancelled()` turns true. A suite that cannot run here says so in its status
("skipped: needs CUDA"); it never makes numbers up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from bench_svc.results_io import Anchor, RunHeader, device_name, make_header

__all__ = ["ProgressFn", "RateProgress", "SuiteCancelled", "SuiteContext", "SuiteResult", "no_progress"]

ProgressFn = Callable[[str, float, Mapping[str, float]], None]  # (message, fraction in [0, 1] or -1, metrics)


def no_progress(message: str, fraction: float, metrics: Mapping[str, float]) -> None:
    """A progress sink that drops everything."""


class SuiteCancelled(Exception):
    """Raised inside a suite when its caller cancelled the run."""


@dataclass(frozen=True)
class SuiteContext:
    """Everything a suite may use; built once per run by the CLI or the queue worker."""

    out_dir: Path  # where result files go
    repo_root: Path  # the checkout: git commit, and the working folder of subprocess suites
    command: tuple[str, ...]  # the exact argv that started the run, recorded in every header
    quick: bool = False  # shorter runs for smoke tests and the demo
    model_path: Path | None = None  # an artifact folder; None means a random-init `preset`
    preset: str = "shakespeare-char"  # the model when no artifact is given
    inference_address: str = ""  # host:port of an InferenceService for the inference suite
    device: str = "cpu"  # torch device of the in-process suites ("cpu", "cuda")
    python: str = "python3"  # interpreter of subprocess suites
    threads: int = 0  # torch CPU threads asked for (--threads); subprocess suites pass it on; 0: their default
    commit: str = ""  # git commit of the code running, taken once at the start of the run; empty: look it up
    progress: ProgressFn = no_progress
    cancelled: Callable[[], bool] = field(default=lambda: False)

    def header(self, anchor: Anchor) -> RunHeader:
        """The header of a result measured in this run on `device`, read against `anchor`."""
        return make_header(device_name(self.device), self.repo_root, self.command, anchor, commit=self.commit or None)

    def check_cancelled(self) -> None:
        """Raises SuiteCancelled when the caller asked the run to stop."""
        if self.cancelled():
            raise SuiteCancelled("cancelled by the caller")


@dataclass(frozen=True)
class SuiteResult:
    """The outcome of one suite: `status` is "ok", "skipped: <why>" or "failed: <why>"."""

    suite: str
    status: str
    files: tuple[Path, ...] = ()
    summary: Mapping[str, float | str] = field(default_factory=dict)  # the key figures, for the run summary
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class RateProgress:
    """Counts steps of a known total and reports each with its rate and ETA: "kvcache 3/10 (1.2 step/s, ETA 6 s) ..."."""

    def __init__(self, ctx: SuiteContext, label: str, total: int, unit: str = "step") -> None:
        self._ctx, self._label, self._total, self._unit = ctx, label, max(total, 1), unit
        self._done = 0
        self._start = time.monotonic()

    def advance(self, detail: str = "", n: int = 1, **metrics: float) -> None:
        """Marks `n` more steps done and reports; raises SuiteCancelled if the caller cancelled meanwhile."""
        self._done += n
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self._done / elapsed
        eta = (self._total - self._done) / rate if rate > 0 else float("nan")
        message = f"{self._label} {self._done}/{self._total} ({rate:.2f} {self._unit}/s, ETA {eta:.0f} s)"
        if detail:
            message += f" {detail}"
        self._ctx.progress(message, min(self._done / self._total, 1.0), {"rate": rate, "eta_s": eta, **metrics})
        self._ctx.check_cancelled()
