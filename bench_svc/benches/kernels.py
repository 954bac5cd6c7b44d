"""Every kernel on the GPU in one run: `python -m bench_svc.benches.kernels` (`bazel run //bench_svc/benches:kernels`).

Measures the ceilings (device copy GB/s, bf16 8192^3 matmul TFLOP/s), then runs the `bench_cases()` of every module
in `BENCH_MODULES` (our kernel beside the best PyTorch alternatives at the same shape), and writes
`bench_svc/results/kernels-<gpu-slug>.{csv,json,png}`; the short table is printed last. Needs a CUDA GPU.
Each row is appended to the CSV (flushed) as soon as it is measured, each shape's alternatives before ours so that
our row carries its speed-up, and a progress line gives its time; the JSON and PNG follow after each module. A run
cut short by a time limit keeps every row it measured.
Before anything is timed, worker processes make the first call of each of our cases, so that the Triton kernels
compile in parallel into Triton's on-disk cache (`kernel_warmup.py`; `--warm-workers 0` turns it off).
To add a kernel: write `kernels/<kernel>_bench.py` with `bench_cases() -> list[BenchCase]` (declared beside the
kernel, `kernels/bench_common.py`) and add its module below. `./tinylm bench --suites kernels` runs this too.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from bench_svc.benches.kernel_report import format_table, write_results
from bench_svc.benches.kernel_timing import BenchResult, Measurement, measure, measure_ceilings, summarize
from bench_svc.benches.kernel_warmup import default_workers, warm_compile_caches
from bench_svc.provenance import RunInfo, git_commit, gpu_slug
from kernels.bench_common import BenchCase

__all__ = ["BENCH_MODULES", "main"]

log = logging.getLogger("bench_svc.benches.kernels")

MODULE = "bench_svc.benches.kernels"

# The registry: each module exposes bench_cases() -> list[BenchCase]. Order is the order of the table.
BENCH_MODULES: tuple[str, ...] = (
    # training kernels
    "kernels.flash_attention_bench",
    "kernels.fused_add_norm_bench",
    "kernels.rmsnorm_cuda.rmsnorm_cuda_bench",
    "kernels.swiglu_bench",
    "kernels.fused_linear_ce_bench",
    # inference kernels
    "kernels.inference_bench",
    "kernels.fused_ffn_bench",
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_GPU_EXIT_CODE = 2


Collected = list[tuple[str, list[tuple[int, BenchCase]]]]  # (module, [(index in its bench_cases(), case)])


def _collect_cases(modules: tuple[str, ...], only: str | None) -> Collected:
    """The cases of each module (in order, with their index), keeping those whose kernel name contains one of
    `only`'s comma-separated words; modules left with no case are dropped."""
    words = [w.strip() for w in (only or "").split(",") if w.strip()]
    collected = []
    for name in modules:
        cases = list(enumerate(importlib.import_module(name).bench_cases()))
        if words:
            cases = [(i, c) for i, c in cases if any(w in c.kernel for w in words)]
        if cases:
            collected.append((name, cases))
    return collected


def _warm_jobs(collected: Collected) -> list[tuple[str, int]]:
    """(module, case index) of each of our cases for the compile warm-up, the first case of each kind ahead of the
    rest, so that the workers start on different compilations rather than the same one side by side. A kind is the
    kernel, the impl and the shape's first word (the M or batch of the inference cases: kernels/inference_bench.py
    labels, where the autotuner compiles per M bucket)."""
    first, rest, seen = [], [], set()
    for name, cases in collected:
        for index, case in cases:
            kind = (case.kernel, case.impl, case.shape.split()[0])
            if case.ours:
                (rest if kind in seen else first).append((name, index))
                seen.add(kind)
    return first + rest


def _alternatives_first(cases: list[BenchCase]) -> list[BenchCase]:
    """The cases grouped by (kernel, shape) in order of first appearance, each group's alternatives ahead of ours."""
    groups: dict[tuple[str, str], list[BenchCase]] = {}
    for case in cases:
        groups.setdefault((case.kernel, case.shape), []).append(case)
    return [case for group in groups.values() for case in sorted(group, key=lambda c: c.ours)]


_CSV_FIELDS = [field.name for field in dataclasses.fields(BenchResult)]  # kernel_report's CSV columns


def _start_rows(path: Path) -> None:
    """A fresh CSV holding the header only (the rows are appended as they are measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.DictWriter(f, _CSV_FIELDS).writeheader()


def _append_row(path: Path, row: BenchResult) -> None:
    """Append one row to the CSV and push it to the disk: a run killed after this call still has it."""
    with path.open("a", newline="") as f:
        csv.DictWriter(f, _CSV_FIELDS).writerow(dataclasses.asdict(row))
        f.flush()
        os.fsync(f.fileno())


def _since(t: float) -> float:
    return time.perf_counter() - t


def _progress(n: int, total: int, run_s: float, case_s: float, row: BenchResult) -> str:
    speedup = f" ({row.speedup_vs_best_alt:.2f}x)" if row.speedup_vs_best_alt is not None else ""
    return (
        f"[{n}/{total} {run_s:5.1f}s] {row.kernel} | {row.shape} | {row.impl}: {row.ms:.4f} ms{speedup}, {case_s:.1f}s"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir", type=Path, default=REPO_ROOT / "bench_svc" / "results", help="where the CSV/JSON/PNG go"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated words: run only the cases whose kernel name contains one (results: kernels-<gpu>-<words>)",
    )
    parser.add_argument(
        "--warm-workers",
        type=int,
        default=None,
        help="processes that compile our kernels into Triton's cache before timing (default: half the cores, at "
        "most 8; 0: none, each kernel compiles on its first timed call)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark; returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print(
            f"{MODULE} needs a CUDA GPU: torch.cuda.is_available() is False on this machine. "
            "Run it on the GPU machine (kernels/gpu_check.sh); the CPU tests are `python -m pytest kernels -q`.",
            file=sys.stderr,
        )
        return NO_GPU_EXIT_CODE
    gpu = torch.cuda.get_device_name()
    info = RunInfo(
        gpu=gpu,
        commit=git_commit(),
        command=shlex.join([sys.executable, "-m", MODULE, *(sys.argv[1:] if argv is None else argv)]),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch_version=torch.__version__,
    )
    collected = _collect_cases(BENCH_MODULES, args.only)
    groups = [_alternatives_first([case for _, case in cases]) for _, cases in collected]
    if not groups:
        print(f"{MODULE}: no case's kernel name contains any of --only {args.only!r}", file=sys.stderr)
        return NO_GPU_EXIT_CODE
    started = time.perf_counter()
    workers = default_workers() if args.warm_workers is None else args.warm_workers
    if workers > 0:
        jobs = _warm_jobs(collected)
        warmed = warm_compile_caches(jobs, workers)
        log.info("compile warm-up: %d of %d cases, %d processes, %.1f s", warmed, len(jobs), workers, _since(started))
    log.info("measuring ceilings on %s", gpu)
    ceilings = measure_ceilings()
    log.info("ceilings: copy %.0f GB/s, bf16 matmul %.0f TFLOP/s", ceilings.copy_gbps, ceilings.matmul_tflops)
    stem = f"kernels-{gpu_slug(gpu)}" + (f"-{gpu_slug(args.only)}" if args.only else "")
    rows_path = args.out_dir / f"{stem}.csv"
    _start_rows(rows_path)
    done: list[BenchCase] = []
    measurements: list[Measurement] = []
    failed, total = 0, sum(len(cases) for cases in groups)
    for cases in groups:
        for case in cases:
            case_started = time.perf_counter()
            try:
                measurements.append(measure(case))
            except Exception:  # one broken case must not lose the rest of the run
                log.exception("case failed: %s | %s | %s", case.kernel, case.shape, case.impl)
                failed += 1
                continue
            done.append(case)
            row = summarize(done, measurements, ceilings)[-1]  # speed-up over the alternatives measured so far
            _append_row(rows_path, row)
            now = time.perf_counter()
            log.info(_progress(len(done) + failed, total, now - started, now - case_started, row))
        # the whole table (CSV, JSON, PNG) after each module, so a run stopped part-way keeps what it measured
        results = summarize(done, measurements, ceilings)
        paths = write_results(results, ceilings, info, args.out_dir, stem)
    log.info("wrote %s in %.1f s", ", ".join(str(p) for p in paths), _since(started))
    print(format_table(results, ceilings))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
