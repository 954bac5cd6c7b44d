"""Streaming detokenization: turn generated token ids into text chunks as they come.

Two things must never reach a caller early:
- half a UTF-8 character (a byte-level token can end mid-character): `model.tokenizers.IncrementalDecoder`
  holds incomplete trailing bytes back until the character completes;
- text that may turn out to be the start of a stop sequence: `model.stop_strings.StopStringMatcher` holds
  back the longest suffix that is a prefix of a stop string until the next token decides it, so a stop
  split across tokens (or chunks) is still found and never shown. The reference generator uses the same
  matcher, so both cut the output at the same place.
"""

from __future__ import annotations

from typing import Sequence

from model.stop_strings import StopStringMatcher
from model.tokenizers import IncrementalDecoder, Tokenizer, piece_texts

__all__ = ["StreamingDetokenizer"]


class StreamingDetokenizer:
    """Feeds token ids in, hands text out; `stopped` once a stop string appears (it is cut, not shown)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._utf8 = IncrementalDecoder(tokenizer)
        self._stops = StopStringMatcher(tuple(stop)) if stop else None  # None: nothing to hold back
        self.pieces: list[str] = []  # the text handed out so far (joined on demand: no copy per token)
        # The fast path (`add_one`, the engine's loop): each id's text when it is whole characters (None there: the
        # slow path). None while no token may take it: stop strings are watched (every token goes through the
        # matcher), or a partial character is held back.
        self._table = piece_texts(tokenizer) if not stop else None
        self.fast_table = self._table

    @property
    def text(self) -> str:
        """All text handed out so far."""
        return "".join(self.pieces)

    @property
    def stopped(self) -> bool:
        return self._stops is not None and self._stops.stopped

    def add(self, token_ids: Sequence[int]) -> str:
        """Decode new tokens; returns the text that is now safe to show (possibly empty). Hot: once per token."""
        stops = self._stops
        if not token_ids or (stops is not None and stops.stopped):
            return ""
        text = self._utf8.push(token_ids)
        self.fast_table = self._table if self._utf8.clean else None
        if stops is not None:
            text = stops.push(text)
        if text:
            self.pieces.append(text)
        return text

    def add_one(self, token: int) -> str:
        """`add((token,))` for the engine's hot loop: a token that is whole characters, with no stop string
        watched and no partial character held, is one table lookup."""
        table = self.fast_table
        if table is not None and 0 <= token < len(table):
            text = table[token]
            if text is not None:
                self.pieces.append(text)
                return text
        return self.add((token,))

    def flush(self) -> str:
        """The generation ended without a stop: hand out everything held (a dangling partial character
        becomes U+FFFD, as a full decode would show it)."""
        if self.stopped:
            return ""
        tail = self._utf8.flush()
        text = tail if self._stops is None else self._stops.push(tail) + self._stops.flush()
        if text:
            self.pieces.append(text)
        return text
