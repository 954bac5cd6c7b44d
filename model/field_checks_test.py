"""The shared field checks: what they accept, what they refuse, and that the message names field and range."""

import math

import pytest

from model.field_checks import FieldError, check_bool, check_choice, check_int, check_number, is_int, is_number


def test_bools_are_neither_ints_nor_numbers():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False)
    assert not is_number(math.nan) and not is_number(math.inf) and not is_number("1")


@pytest.mark.parametrize("value", [0, 11, True, 2.0, "3", None])
def test_check_int_refuses_with_field_and_range(value):
    with pytest.raises(FieldError, match=r"^n must be an integer in \[1, 10\] \(note\), got ") as info:
        check_int("n", value, 1, 10, note=" (note)")
    assert info.value.field == "n"


def test_check_int_open_above():
    assert check_int("n", 10**9, 1) == 10**9
    with pytest.raises(FieldError, match=r"^n must be an integer >= 1, got 0$"):
        check_int("n", 0, 1)


@pytest.mark.parametrize(
    "kwargs, good, bad, text",
    [
        (dict(lo=0.0, hi=1.0, hi_open=True), 0.0, 1.0, r"in \[0.0, 1.0\)"),
        (dict(lo=0, hi=1, lo_open=True), 1, 0, r"in \(0, 1\]"),
        (dict(lo=0, lo_open=True), 1e9, 0, r"> 0"),
        (dict(lo=0), 0, -1e-9, r">= 0"),
    ],
)
def test_check_number_bounds(kwargs, good, bad, text):
    assert check_number("x", good, **kwargs) == float(good)
    for value in (bad, math.nan, math.inf, True, "1"):
        with pytest.raises(FieldError, match=rf"^x must be a number {text}, got "):
            check_number("x", value, **kwargs)


def test_caller_error_type():
    class MyError(ValueError):
        def __init__(self, key, message):
            super().__init__(message)
            self.key = key

    with pytest.raises(MyError, match=r"^mode must be one of \['a', 'b'\], got 'c'$"):
        check_choice("mode", "c", ("a", "b"), error=MyError)
    with pytest.raises(MyError, match=r"^flag must be true or false, got 1$"):
        check_bool("flag", 1, error=MyError)
    assert check_choice("mode", "a", ("a", "b")) == "a" and check_bool("flag", False) is False
