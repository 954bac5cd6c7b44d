"""Checking one argument or config field: an integer, a finite number, one of some choices, a bool.

The one place for these rules below the services (model/, trainer/, exporter/ and inference_svc/ use it), so
every refusal reads the same: `top_k must be an integer >= 0 (0 = off), got -1`, naming the field and the
allowed range. A bool is never an integer or a number here (Python's `True == 1` would pass a range check).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

__all__ = [
    "FieldError",
    "is_int",
    "is_number",
    "int_message",
    "number_message",
    "check_int",
    "check_number",
    "check_choice",
    "check_bool",
]

# Builds the exception a check raises from (field, message); FieldError, or a caller's subclass or look-alike.
ErrorFactory = Callable[[str, str], Exception]


class FieldError(ValueError):
    """A field's value is refused: `field` names it, the message (which starts with the field) the allowed range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def is_int(value: Any) -> bool:
    """An int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_message(name: str, value: Any, lo: int, hi: int | None = None, note: str = "") -> str:
    """`name must be an integer in [lo, hi]<note>, got value` (`>= lo` when there is no upper bound)."""
    allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    return f"{name} must be an integer {allowed}{note}, got {value!r}"


def number_message(
    name: str,
    value: Any,
    lo: float,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    note: str = "",
) -> str:
    """`name must be a number in (lo, hi]<note>, got value` (`> lo` or `>= lo` when there is no upper bound)."""
    if hi is None:
        allowed = f"{'>' if lo_open else '>='} {lo}"
    else:
        allowed = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return f"{name} must be a number {allowed}{note}, got {value!r}"


def check_int(
    name: str, value: Any, lo: int, hi: int | None = None, *, note: str = "", error: ErrorFactory = FieldError
) -> int:
    """`value` if it is an integer in [lo, hi] (hi None: no upper bound), else raise `error(name, message)`."""
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        raise error(name, int_message(name, value, lo, hi, note))
    return value


def check_number(
    name: str,
    value: Any,
    lo: float,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    note: str = "",
    error: ErrorFactory = FieldError,
) -> float:
    """`float(value)` if it is a finite number within the bounds (open or closed; hi None: no upper bound),
    else raise `error(name, message)`."""
    ok = is_number(value) and (value > lo if lo_open else value >= lo)
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise error(name, number_message(name, value, lo, hi, lo_open=lo_open, hi_open=hi_open, note=note))
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[Any], *, error: ErrorFactory = FieldError) -> Any:
    """`value` if it is one of `choices`, else raise `error(name, "name must be one of [...], got value")`."""
    if value not in choices:
        raise error(name, f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any, *, error: ErrorFactory = FieldError) -> bool:
    """`value` if it is True or False, else raise `error(name, "name must be true or false, got value")`."""
    if not isinstance(value, bool):
        raise error(name, f"{name} must be true or false, got {value!r}")
    return value
