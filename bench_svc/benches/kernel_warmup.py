"""Compile a kernel benchmark's Triton kernels in parallel before anything is timed.

A bare GPU machine starts with an empty Triton cache, and each of our autotuned kernels compiles every config on its
first call: one process does that one config after another (the wo_matmul rows alone are ~60 compilations of
0.3-1.7 s). `warm_compile_caches` makes the first call of each of our cases in worker processes instead (spawned, one
CUDA context each): the compiled kernels land in Triton's on-disk cache, which the benchmark process then reads
instead of compiling. The workers' own tuning choices are thrown away (they share the GPU while they run); the
benchmark process still tunes, on a quiet GPU. The workers are gone before the ceilings are measured.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os

import torch

__all__ = ["WARM_TIMEOUT_S", "default_workers", "warm_compile_caches", "warm_one"]

log = logging.getLogger("bench_svc.benches.kernels")

# The whole warm-up (expected ~20 s for `--only decode,wo_matmul` on an H200 host); past it the workers are killed and
# the run goes on, compiling what is left itself. Also the bound on a worker that died without an answer.
WARM_TIMEOUT_S = 60.0
MAX_WORKERS = 8


def default_workers() -> int:
    """Half the CPU cores (compilation is CPU work), at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) // 2))


def warm_one(job: tuple[str, int]) -> str | None:
    """In a worker: set up case `index` of module `name`'s `bench_cases()` and call it once (compiling and tuning its
    kernels); returns what went wrong, or None."""
    name, index = job
    try:
        case = importlib.import_module(name).bench_cases()[index]
        case.setup()()
        torch.cuda.synchronize()
    except Exception as err:  # reported by the caller; the benchmark itself will meet (and report) it again
        return f"{name} case {index}: {type(err).__name__}: {err}"[:500]
    return None


def warm_compile_caches(jobs: list[tuple[str, int]], workers: int, timeout_s: float = WARM_TIMEOUT_S) -> int:
    """Run `warm_one` over `jobs` ((module, case index) pairs) in `workers` spawned processes, then kill them;
    returns how many jobs finished cleanly. workers < 1 or no jobs: nothing to do."""
    if workers < 1 or not jobs:
        return 0
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
    try:
        errors = pool.map_async(warm_one, jobs, chunksize=1).get(timeout_s)
    except multiprocessing.TimeoutError:
        log.warning("compile warm-up: not done after %.0f s; stopped, the run compiles the rest itself", timeout_s)
        return 0
    finally:
        pool.terminate()  # nothing of theirs may run on the GPU while the ceilings and the cases are timed
        pool.join()
    for error in filter(None, errors):
        log.warning("compile warm-up: %s", error)
    return sum(error is None for error in errors)
