"""Running another package's own benchmark entry point (`python -m bench_svc.benches.kernels`, ...) as a suite.

bench_svc never imports another service's internals: a suite that wraps one runs its entry point in a child
process, forwards its output lines as progress, stops it when the run is cancelled or runs out of time, and
collects the result files it wrote into the run's output folder.
"""

from __future__ import annotations

import importlib.util
import queue
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import torch

from bench_svc.suite import SuiteCancelled, SuiteContext, SuiteResult

__all__ = ["module_available", "run_gpu_module", "run_module", "stop_process", "thread_args"]

TAIL_LINES = 20


def module_available(module: str) -> bool:
    """True when `module` (dotted name) can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def thread_args(ctx: SuiteContext) -> list[str]:
    """`--threads N` when the run asked for N threads (a child process does not inherit torch's setting), else []."""
    return ["--threads", str(ctx.threads)] if ctx.threads else []


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it outlives `grace_s`; reaps it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _snapshot(folder: Path) -> dict[Path, tuple[int, int]]:
    """(mtime_ns, size) of every file in `folder`: what a child wrote is what is new or changed afterwards."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()}


def _pump(stream, lines: "queue.Queue[str | None]") -> None:
    for line in iter(stream.readline, ""):
        lines.put(line.rstrip("\n"))
    lines.put(None)


def run_module(
    ctx: SuiteContext,
    suite: str,
    module: str,
    args: Sequence[str] = (),
    *,
    prefix: str = "",
    timeout_s: float = 3600.0,
) -> SuiteResult:
    """Runs `python -m module *args` in the repo root; returns "ok" with the files it wrote into ctx.out_dir (those
    whose names start with `prefix`: others may share the folder), or "failed: ..." with the end of its output.
    Raises SuiteCancelled (after stopping the child) on cancel."""
    start = time.monotonic()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    before = _snapshot(ctx.out_dir)
    argv = [ctx.python, "-m", module, *args]
    ctx.progress(f"{suite}: running {' '.join(argv)}", 0.0, {})
    proc = subprocess.Popen(argv, cwd=ctx.repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str | None]" = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        while True:
            if ctx.cancelled():
                raise SuiteCancelled(f"{suite}: cancelled by the caller")
            if time.monotonic() - start > timeout_s:
                proc.kill()
                proc.wait()
                return SuiteResult(
                    suite, f"failed: {module} ran past {timeout_s:.0f} s", (), {}, time.monotonic() - start
                )
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            tail.append(line)
            if line.strip():
                ctx.progress(f"{suite}: {line.strip()}", -1.0, {})
        code = proc.wait()
    finally:
        stop_process(proc)
    after = _snapshot(ctx.out_dir)
    files = tuple(sorted(p for p, stamp in after.items() if before.get(p) != stamp and p.name.startswith(prefix)))
    seconds = time.monotonic() - start
    if code != 0:
        last = " | ".join(line.strip() for line in list(tail)[-3:] if line.strip())
        return SuiteResult(suite, f"failed: {module} exited with {code}: {last}", files, {}, seconds)
    return SuiteResult(suite, "ok", files, {"exit_code": 0}, seconds)


def run_gpu_module(
    ctx: SuiteContext, suite: str, module: str, args: Sequence[str], measures: str, *, prefix: str = ""
) -> SuiteResult:
    """`run_module` for a benchmark that only means something on a GPU: "skipped: needs CUDA (...)" without one."""
    if not torch.cuda.is_available():
        return SuiteResult(suite, f"skipped: needs CUDA (the {suite} benchmark {measures} on a GPU)")
    if not module_available(module):
        return SuiteResult(suite, f"skipped: {module} is not available in this checkout")
    return run_module(ctx, suite, module, args, prefix=prefix)
