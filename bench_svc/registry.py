"""The benchmark suites there are, by the names BenchSpec uses, and which of them need a model artifact."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable

__all__ = ["DEFAULT_SUITES", "SUITES", "load_suite", "needing_a_model", "parse_suites"]

# name -> module with `run(ctx) -> SuiteResult`; the order is the order a run and its report follow.
SUITES: dict[str, str] = {
    "kvcache": "bench_svc.kvcache",
    "memory": "bench_svc.memory",
    "inference": "bench_svc.inference_load",
    "serving": "bench_svc.serving",
    "http": "bench_svc.http_suite",
    "export": "bench_svc.export",
    "jobs": "bench_svc.jobs_throughput",
    "speculative": "bench_svc.speculative",
    "compile": "bench_svc.compile_modes",
    "checkpointing": "bench_svc.checkpointing",
    "kernels": "bench_svc.kernels",
    "training": "bench_svc.training",
}

# What an empty suite list means: the suites that run anywhere, quickly, with nothing else started.
DEFAULT_SUITES: tuple[str, ...] = ("kvcache", "memory")


def parse_suites(names: Iterable[str]) -> list[str]:
    """The suites to run, in registry order, without repeats; empty means DEFAULT_SUITES.

    Raises ValueError naming the unknown ones and the allowed names."""
    wanted = [n.strip() for n in names if n.strip()]
    unknown = sorted(set(wanted) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; allowed: {', '.join(SUITES)}")
    chosen = set(wanted or DEFAULT_SUITES)
    return [name for name in SUITES if name in chosen]


def load_suite(name: str) -> ModuleType:
    """The module of suite `name` (imported on first use, so a suite's heavy imports cost only its own runs)."""
    return importlib.import_module(SUITES[name])


def needing_a_model(names: Iterable[str], inference_address: str = "") -> list[str]:
    """Those of `names` that need a model artifact: `inference` when it must start its own server to load.

    The others measure the run's artifact when one is given, else a random-init preset (speed and memory do not
    depend on the weights' values)."""
    return [n for n in names if n == "inference" and not inference_address]
