"""Where a new training process spends the time before its first step, import by import.

`python -m tools.startup_probe` starts fresh interpreters (their bytecode caches warm: each measurement is taken
twice and the second kept) and prints two tables:
- serial: one process importing, in order, torch, the benchmark's own modules (what `--startup VARIANT:run` loads
  before training), each of the compiler modules the trainer preloads (trainer.warm_start.COMPILER_MODULES), then
  initialising CUDA: each phase's seconds, with nothing else running beside it;
- heaviest: `python -X importtime` of the same imports, the modules with the largest cumulative import time at the
  top two levels of the import tree.
Read beside a launch's own start-up line (`trainer.train: start-up: ...`): an import that takes longer there than
here lost the GIL to the main thread's set-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from trainer.warm_start import COMPILER_MODULES

PROJECT_MODULES = ("bench_svc.benches.training",)  # imports trainer.train, model, kernels, safetensors, matplotlib

_SERIAL = r"""
import importlib, json, sys, time
phases, t0 = [], time.perf_counter()
def mark(name):
    global t0
    now = time.perf_counter(); phases.append((name, now - t0)); t0 = now
import torch; mark("import torch")
for name in sys.argv[1].split(","):
    importlib.import_module(name); mark("import " + name)
if torch.cuda.is_available():
    torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize(); mark("CUDA init + first tensor")
print(json.dumps(phases))
"""


def serial_phases(modules: list[str]) -> list[tuple[str, float]]:
    """Each phase's seconds in a fresh interpreter (run twice: the first may write bytecode caches)."""
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _SERIAL, ",".join(modules)], capture_output=True, text=True,
                              check=True)  # fmt: skip
    return [tuple(p) for p in json.loads(done.stdout.strip().splitlines()[-1])]


def heaviest_imports(modules: list[str], top: int = 25, max_depth: int = 2) -> list[tuple[str, float, float]]:
    """(module, cumulative s, self s) of the largest imports at the import tree's top `max_depth` levels."""
    code = "\n".join(f"import {name}" for name in ["torch", *modules])
    for _ in range(2):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                              check=True)  # fmt: skip
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = (part for part in line[len("import time:") :].split("|"))
        depth = (len(name) - len(name.lstrip(" "))) // 2
        if depth < max_depth:
            rows.append((name.strip(), int(cumulative_us) / 1e6, int(self_us) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.startup_probe", description=__doc__.split("\n")[0])
    p.add_argument("--top", type=int, default=25, help="rows of the -X importtime table")
    args = p.parse_args(argv)
    modules = [*PROJECT_MODULES, *COMPILER_MODULES]
    heavy = heaviest_imports(modules, top=args.top)
    phases = serial_phases(modules)
    print(f"{'heaviest imports (-X importtime)':<60} {'cum s':>7} {'self s':>7}")
    for name, cumulative, own in heavy:
        print(f"{name:<60} {cumulative:7.3f} {own:7.3f}")
    print(f"\n{'serial phase (fresh process)':<60} {'s':>7}")
    for name, seconds in phases:
        print(f"{name:<60} {seconds:7.3f}")
    print(f"{'total':<60} {sum(s for _, s in phases):7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
