"""Autotuning decisions kept across processes: a new process on the same GPU skips the tuning its kernels did before.

The trainer's warm start pays for every tuner that runs in its first step: with the fused add + norm on (the
shakespeare-char presets), a new process's first step came 3.5 s later than without it on an H200 (14.0 -> 17.5 s
from launch, 2026-11-30), about what the add + norm's forward and backward tuners take. Triton's `cache_results`
covers `triton.autotune` only; the add + norm backward times its candidates itself (in a CUDA graph, with the
partial sum), so both keep their picks here.

One JSON file in Triton's cache folder (`triton.knobs.cache.dir`: TRITON_CACHE_DIR, else ~/.triton/cache): {entry: config}, an entry naming
the kernel, its tuning key, the GPU and the torch and triton versions. A remembered config is used only while it is
still one of the kernel's candidates (a changed candidate set tunes again). Writes merge with the file under a lock
and replace it atomically: concurrent processes lose nothing, and a reader never sees half a file; an unreadable
file counts as empty (and is rewritten). `TINYLM_TUNE_CACHE=0` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import triton

__all__ = ["FILE_NAME", "enabled", "path", "recall", "remember"]

FILE_NAME = "tinylm-tuning.json"
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("TINYLM_TUNE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def path() -> Path:
    """The cache file: in Triton's cache folder, so a run with its own TRITON_CACHE_DIR (a cold start) has its own."""
    return Path(triton.knobs.cache.dir) / FILE_NAME


def _entry(kernel: str, key: Sequence[Any], device: str) -> str:
    return json.dumps([kernel, [str(k) for k in key], device, torch.__version__, triton.__version__])


def _encode(config: triton.Config) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _read(file: Path) -> dict[str, Any]:
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the unreadable tuning cache %s: %s", file, err)
        return {}
    return doc if isinstance(doc, dict) else {}


def recall(kernel: str, key: Sequence[Any], device: str, candidates: Sequence[triton.Config]) -> triton.Config | None:
    """The config remembered for (kernel, key) on `device` if it is one of `candidates` (that candidate), else None."""
    if not enabled():
        return None
    stored = _read(path()).get(_entry(kernel, key, device))
    if stored is None:
        return None
    for config in candidates:
        if _encode(config) == stored:
            return config
    return None


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_name(file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remember(kernel: str, key: Sequence[Any], device: str, config: triton.Config) -> None:
    """Keep `config` as the pick for (kernel, key) on `device`. A cache that cannot be written costs only a retune."""
    if not enabled():
        return
    file = path()
    try:
        with _locked(file):
            doc = _read(file)
            doc[_entry(kernel, key, device)] = _encode(config)
            fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out, indent=1, sort_keys=True)
            os.replace(tmp, file)
    except OSError as err:
        log.warning("could not keep a tuning decision in %s: %s", file, err)
