"""Stop strings over streamed text: emit what is safe, hold back what might be the start of a stop.

Used by the reference generator and by the serving engine, so both cut output at the same place.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Feed generated text in pieces with `push`; it returns the text that can be sent now.

    Text that could still become a stop string is held back until it cannot; once a stop string appears,
    `stopped` is True and nothing from the stop string on is ever returned. `flush()` releases what is
    held back when generation ends for another reason (max_new_tokens, end of context).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        assert all(stop), "stop strings must be non-empty"
        self.stop = tuple(stop)
        self.stopped = False
        self._held = ""
        self._keep = max((len(s) - 1 for s in self.stop), default=0)

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buf[:cut]
        hold = self._holdback(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(self._keep, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
