"""Tests of the streaming stop-string matcher."""

from __future__ import annotations

from model.stop_strings import StopStringMatcher


def _run(stop, pieces):
    m = StopStringMatcher(stop)
    out = [m.push(p) for p in pieces]
    return "".join(out) + m.flush(), m.stopped, out


def test_stop_across_pieces_is_cut():
    text, stopped, out = _run(["END"], ["hello E", "N", "D and more"])
    assert text == "hello " and stopped
    assert out[0] == "hello "  # "E" held back: it may start "END"


def test_false_start_released():
    text, stopped, _ = _run(["END"], ["an E", "Nx", " done"])
    assert text == "an ENx done" and not stopped


def test_earliest_of_several_stops():
    text, stopped, _ = _run(["\n\n", "B"], ["aaa B\n\nccc"])
    assert text == "aaa " and stopped


def test_no_stops_passes_everything():
    text, stopped, out = _run([], ["a", "b"])
    assert text == "ab" and out == ["a", "b"] and not stopped


def test_held_text_flushed_at_end():
    text, stopped, out = _run(["xyz"], ["abcx", "y"])
    assert out == ["abc", ""] and text == "abcxy" and not stopped
