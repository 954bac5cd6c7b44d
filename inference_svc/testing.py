"""Helpers for tests that drive a live engine: wait for a condition, and tell when the engine holds nothing."""

from __future__ import annotations

import time
from typing import Callable

from inference_svc.engine import Engine

__all__ = ["engine_idle", "wait_until"]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `predicate` every 10 ms until it holds or `timeout` seconds pass; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def engine_idle(engine: Engine) -> bool:
    """Every slot free and no request queued, running or in flight."""
    s = engine.stats()
    return s.free_slots == s.max_slots and s.queued == s.running == s.in_flight == 0
