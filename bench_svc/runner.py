"""Running a list of suites as one benchmark run: progress across them, a summary result, and report.md.

A suite that raises is recorded as "failed: ..." and the run goes on; a cancelled run stops at once. The summary
(`summary-<device>.{csv,json}`: one row per suite with its status, time and key figures) goes through the same
writer as every suite, so report.md shows skipped and failed suites beside the measured ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from bench_svc.registry import load_suite
from bench_svc.report import SUMMARY_SUITE, write_report
from bench_svc.results_io import Anchor, git_commit, write_results
from bench_svc.suite import SuiteCancelled, SuiteContext, SuiteResult

__all__ = ["RunOutcome", "run_suites"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    results: tuple[SuiteResult, ...]
    files: tuple[Path, ...]  # every file the run wrote: the suites', the summary's and report.md
    report: Path
    device: str
    commit: str


def _scoped(ctx: SuiteContext, index: int, count: int) -> SuiteContext:
    """ctx whose progress fractions are mapped into this suite's share of the whole run."""

    def progress(message: str, fraction: float, metrics: Mapping[str, float]) -> None:
        overall = (index + fraction) / count if fraction >= 0 else -1.0
        ctx.progress(message, overall, metrics)

    return dataclasses.replace(ctx, progress=progress)


def _run_one(name: str, ctx: SuiteContext) -> SuiteResult:
    start = time.monotonic()
    try:
        return load_suite(name).run(ctx)
    except SuiteCancelled:
        raise
    except Exception as err:  # one broken suite must not lose the others' results
        log.exception("suite %s failed", name)
        return SuiteResult(name, f"failed: {type(err).__name__}: {err}", (), {}, time.monotonic() - start)


def _summary_row(result: SuiteResult) -> dict[str, object]:
    figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.summary.items())
    return {
        "suite": result.suite,
        "status": result.status,
        "seconds": round(result.seconds, 2),
        "files": " ".join(p.name for p in result.files),
        "key_figures": figures,
    }


def run_suites(names: Sequence[str], ctx: SuiteContext) -> RunOutcome:
    """Runs `names` (already validated) in order, then writes the summary and report.md into ctx.out_dir."""
    if not ctx.commit:
        ctx = dataclasses.replace(ctx, commit=git_commit(ctx.repo_root))  # one commit for every file of the run
    results = []
    for i, name in enumerate(names):
        ctx.check_cancelled()
        ctx.progress(f"suite {i + 1}/{len(names)}: {name}", i / len(names), {})
        result = _run_one(name, _scoped(ctx, i, len(names)))
        results.append(result)
        ctx.progress(f"suite {name}: {result.status} ({result.seconds:.1f} s)", (i + 1) / len(names), {})
    header = ctx.header(Anchor("none: one row per suite; each suite names its own"))
    summary_files = write_results(ctx.out_dir, SUMMARY_SUITE, header, [_summary_row(r) for r in results])
    report = write_report(ctx.out_dir)
    files = tuple(dict.fromkeys([f for r in results for f in r.files] + summary_files + [report]))
    return RunOutcome(tuple(results), files, report, header.device, header.git_commit)
