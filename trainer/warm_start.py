"""What a launch of the trainer can do so that its first step comes sooner: import torch's compiler in the background,
and, in a long-lived worker, keep what one run compiled for the next run of the same shape.

A warm start (every compile cache hit) still spends most of its time before the first step importing the compiler:
torch._dynamo, AOT autograd, Inductor, sympy and networkx are imported lazily, at the optimizer's first use and
inside dynamo's first trace (1.9 s of a 6-10 s warm start on the 2-core CPU, trainer/PERF_NOTES.md section 10).
`preload_compiler()` imports them on a daemon thread started first thing by an entry point, while the main thread
reads the corpus, builds the model and initialises the device; the run waits for it (`CompilerPreload.wait`) just
before its first compiler use, so the two threads never import the same compiler module at once (a concurrent
circular import can fail with a deadlock error). Importing changes no number a run computes.

CUDA's own initialisation (the driver, the device's primary context) runs inside torch's first CUDA call with the
GIL held (torch/csrc/cuda/Module.cpp, THCPModule_initExtension), so while it runs the compiler's import thread stands
still: in a new process on the H200 that import took 8.7-9.1 s against 3.7 s where CUDA was already up
(trainer/PERF_NOTES.md section 13). `preload_cuda()` does the driver's part first, on a thread of its own through
ctypes (which releases the GIL during the call): cuInit and the device's primary context, the one torch's runtime
then uses, so its initialisation finds them done. Without a driver (a CPU machine) it does nothing.

A worker trains job after job in one process. Dynamo's compiled code stays in the process, keyed by the model's
code and guarded on shapes, dtypes and flags, so a second job with the same config reuses it (no tracing, no cache
loading: measured on the CPU, 8.4 s -> 0.6 s to the first step) and, under reduce-overhead, only records its CUDA
graphs again (its parameters live at new addresses). `CompiledReuse` drops that state when a job of another shape
comes (`torch._dynamo.reset()`), so the process never holds more than one config's graphs and never reaches
dynamo's recompile limit, past which a frame silently runs eager. `train()` asks the process's one (`before_run`)
before every run, whoever starts it: on the H200 a worker's reduce-overhead job failed at its first backward
("CUDA driver error: invalid argument" recording a CUDA-graph tree) when the same process had trained the Muon
recipe four ways just before through train() directly, whose compiled code and graph trees nothing had dropped;
the same job passed alone and after the plain sequences (eighth session, call 3; PERF_NOTES 14).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import threading
import time
from typing import Any

__all__ = [
    "COMPILER_MODULES",
    "CompilerPreload",
    "CompiledReuse",
    "RUN_ONLY_FIELDS",
    "before_run",
    "compile_key",
    "preload_compiler",
    "preload_cuda",
    "preload_for",
    "wait_cuda_preload",
    "started_preload",
]

log = logging.getLogger(__name__)

# What a warm compiled launch imports after the trainer's own modules (python -X importtime, torch 2.13, CPU; the
# CUDA path adds Inductor's Triton runtime), roots first: each pulls in the rest (sympy, networkx, the codegens).
# Not torch._inductor.cudagraph_trees (2 ms): at import it stashes Python objects in the importing thread's C++
# thread-local state, and from a thread that then ends, the process aborted at exit in 3-5 of 10 runs ("terminate
# called without an active exception"); none of these modules imports it.
COMPILER_MODULES = (
    "torch._dynamo",
    "torch._dynamo.repro.after_dynamo",
    "torch._functorch.aot_autograd",
    "torch._inductor.compile_fx",
    "torch._inductor.codecache",
    "torch._inductor.async_compile",
    "torch._inductor.runtime.triton_heuristics",
)


class CompilerPreload:
    """A daemon thread importing `modules` in order. A module that fails to import is logged and skipped: the run
    imports it itself later, and fails there with the real error if it must."""

    def __init__(self, modules: tuple[str, ...] = COMPILER_MODULES) -> None:
        self.modules = modules
        self.started = time.perf_counter()
        self.import_s: float | None = None  # how long the imports took, once done
        self.failed: dict[str, str] = {}  # module -> the error, for the log
        self._thread = threading.Thread(target=self._run, name="compiler-preload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception as err:  # noqa: BLE001 - any failure only means the run imports it itself
                self.failed[name] = f"{type(err).__name__}: {err}"
        self.import_s = time.perf_counter() - self.started
        if self.failed:
            log.warning("compiler preload could not import %s", self.failed)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> float:
        """Block until the imports are done; the seconds this call waited."""
        t0 = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - t0


_lock = threading.Lock()
_preload: CompilerPreload | None = None  # one per process: imports are process-wide, a second thread would only wait


def preload_compiler() -> CompilerPreload:
    """Start importing the compiler in the background (once per process; later calls return the same preload)."""
    global _preload
    with _lock:
        if _preload is None:
            _preload = CompilerPreload()
        return _preload


def started_preload() -> CompilerPreload | None:
    """The process's preload if one was started (an eager run waits for it too before touching torch.optim, whose
    first use imports torch._dynamo), else None."""
    with _lock:
        return _preload


_cuda_thread: threading.Thread | None = None
CUDA_DRIVER = "libcuda.so.1"


def preload_cuda(ordinal: int | None = None) -> threading.Thread:
    """Start the CUDA driver's initialisation and the primary context of device `ordinal` (default: LOCAL_RANK, else
    0; CUDA_VISIBLE_DEVICES numbering) on a daemon thread (once per process); the thread, finished or not. What it
    did goes to the debug log; any failure only leaves the work to torch."""
    global _cuda_thread
    with _lock:
        if _cuda_thread is None:
            index = int(os.environ.get("LOCAL_RANK", "0")) if ordinal is None else ordinal
            _cuda_thread = threading.Thread(target=_retain_primary_context, args=(index,), name="cuda-preload",
                                            daemon=True)  # fmt: skip
            _cuda_thread.start()
        return _cuda_thread


def wait_cuda_preload() -> float:
    """Block until a started CUDA preload is done (no-op without one): call it before torch's first CUDA call, so
    that call finds the driver up rather than doing it with the GIL held. Seconds waited (the GIL is free meanwhile,
    so the compiler's import goes on)."""
    with _lock:
        thread = _cuda_thread
    t0 = time.perf_counter()
    if thread is not None:
        thread.join()
    return time.perf_counter() - t0


def preload_for(config: Any) -> None:
    """An entry point's preloads for a run of `config`: CUDA's driver where the run may use a CUDA device, the
    compiler where it compiles."""
    device = str(config.device)
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        preload_cuda(int(device[5:]) if device.startswith("cuda:") else None)
    if config.compile or config.compile_optimizer:
        preload_compiler()


def _retain_primary_context(ordinal: int) -> str:
    """cuInit(0), cuDeviceGet, cuDevicePrimaryCtxRetain through the driver library; a word on what happened.
    TINYLM_CUDA_PRELOAD=0 turns it off (torch then does it all at its first CUDA call)."""
    t0 = time.perf_counter()
    if os.environ.get("TINYLM_CUDA_PRELOAD", "1") == "0":
        return "off (TINYLM_CUDA_PRELOAD=0)"
    try:
        driver = ctypes.CDLL(CUDA_DRIVER)
    except OSError:
        outcome = "no CUDA driver"
    else:
        device, context = ctypes.c_int(), ctypes.c_void_p()
        codes = [driver.cuInit(0)]
        if codes[-1] == 0:
            codes.append(driver.cuDeviceGet(ctypes.byref(device), ordinal))
        if codes[-1] == 0:  # retained for the process's life, as torch's runtime retains it too
            codes.append(driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device))
        outcome = "primary context ready" if codes[-1] == 0 else f"driver error {codes[-1]} (step {len(codes)})"
    log.debug("CUDA preload for device %d: %s in %.2f s", ordinal, outcome, time.perf_counter() - t0)
    return outcome


# TrainConfig fields that change what a run does but not the graphs it compiles (schedules, lengths, logging, seed,
# where it writes); every other field, including any added later, is taken to shape the compiled code.
RUN_ONLY_FIELDS = frozenset({
    "name", "max_steps", "lr", "min_lr", "warmup", "decay", "decay_steps", "warmdown_steps", "muon_lr",
    "eval_interval", "eval_iters", "log_interval", "seed", "early_stop_patience", "log_dir", "resume", "tensorboard",
    "eval_mode", "checkpoint_interval", "ema_decay",  # evaluation and bookkeeping outside the compiled step
})  # fmt: skip


def compile_key(config: Any) -> tuple:
    """What a run's compiled code depends on: its config without RUN_ONLY_FIELDS, hashable."""
    return tuple(sorted((k, repr(v)) for k, v in config.to_dict().items() if k not in RUN_ONLY_FIELDS))


class CompiledReuse:
    """Keeps dynamo's compiled code between a worker's runs of the same compile_key and drops it between runs of
    different ones. Correctness never rests on the key: dynamo's guards check every compiled frame anyway; the key
    only bounds what the process keeps."""

    def __init__(self) -> None:
        self._key: tuple | None = None

    def before_run(self, config: Any) -> bool:
        """Call before each run; True when the previous run's compiled code is kept for this one."""
        key = compile_key(config) if config.compile else None
        keep = key is not None and key == self._key
        if not keep and self._key is not None:
            import torch

            torch._dynamo.reset()  # the last compiled run's code, guards and CUDA graphs
        self._key = key
        return keep


_process_reuse = CompiledReuse()  # the process's, for every run train() starts


def before_run(config: Any) -> bool:
    """What `train()` calls first: the process keeps dynamo's compiled code (and torch.compile's CUDA-graph trees) only
    from a previous run of the same compile_key, and drops it before any other run, whoever starts the runs (a worker,
    the benchmark's variants, a test). True when the previous run's code is kept."""
    with _lock:
        return _process_reuse.before_run(config)
