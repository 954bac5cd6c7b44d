"""Streaming detokenization never shows half a character or any part of a stop string."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from inference_svc.detokenizer import StreamingDetokenizer
from model.tokenizers import ByteTokenizer, CharTokenizer

BYTES = ByteTokenizer()


def _stream(tokenizer, ids, stop=(), chunk=1):
    detok = StreamingDetokenizer(tokenizer, stop)
    pieces = []
    for i in range(0, len(ids), chunk):
        pieces.append(detok.add(ids[i : i + chunk]))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_are_never_split():
    text = "héllo → wörld €100 🙂!"
    pieces, detok = _stream(BYTES, BYTES.encode(text))
    assert "".join(pieces) == text == detok.text
    assert all("\ufffd" not in p for p in pieces)
    # The 4-byte emoji arrives whole in exactly one piece, after three empty ones.
    emoji_piece = next(i for i, p in enumerate(pieces) if "🙂" in p)
    assert pieces[emoji_piece] == "🙂" and pieces[emoji_piece - 3 : emoji_piece] == ["", "", ""]


def test_dangling_partial_character_flushes_as_replacement():
    ids = BYTES.encode("ab€")[:-1]  # cut the euro sign's last byte
    pieces, _ = _stream(BYTES, ids)
    assert pieces[:-1] == ["a", "b", "", ""] and pieces[-1] == "\ufffd"
    assert "".join(pieces) == BYTES.decode(ids)


def test_stop_split_across_tokens_is_cut_and_never_shown():
    tok = CharTokenizer.from_corpus("abcdENDx ")
    pieces, detok = _stream(tok, tok.encode("abc ENx END dd"), stop=["END"])
    assert detok.stopped and detok.text == "abc ENx "
    # "E", "N" are held until "x" shows they were not a stop; the final "E", "N", "D" are never shown.
    assert pieces == ["a", "b", "c", " ", "", "", "ENx", " ", "", "", "", ""]


def test_held_prefix_released_when_it_does_not_become_a_stop():
    tok = CharTokenizer.from_corpus("abcEND")
    detok = StreamingDetokenizer(tok, ["END"])
    assert detok.add(tok.encode("abcE")) == "abc"
    assert detok.add(tok.encode("N")) == ""
    assert detok.add(tok.encode("a")) == "ENa"
    assert detok.add(tok.encode("EN")) == ""
    assert detok.flush() == "EN" and not detok.stopped


def test_earliest_of_several_stops_wins():
    tok = CharTokenizer.from_corpus("abcdxyz")
    pieces, detok = _stream(tok, tok.encode("abxyzcd"), stop=["cd", "xyz"], chunk=7)
    assert detok.text == "ab" and detok.stopped
    assert detok.add(tok.encode("a")) == "" and detok.flush() == ""


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abé€🙂\n ", max_size=30),
    stop=st.text(alphabet="abé€🙂\n ", min_size=1, max_size=4),
    chunk=st.integers(1, 6),
)
def test_any_chunking_gives_the_full_decode_cut_at_the_first_stop(text, stop, chunk):
    pieces, detok = _stream(BYTES, BYTES.encode(text), stop=[stop], chunk=chunk)
    cut = text.find(stop)
    expected = text if cut < 0 else text[:cut]
    assert "".join(pieces) == expected == detok.text
    assert detok.stopped == (cut >= 0)


@settings(max_examples=150, deadline=None)
@given(text=st.text(min_size=0, max_size=30), stop=st.sampled_from([(), ("lo",), ("€1", "🙂")]))
def test_add_one_equals_add_token_by_token(text, stop):
    """The engine's fast path (`add_one`: a table lookup while no stop is watched and no partial character is held)
    hands out the same pieces as `add((token,))`, and is off exactly while it may not serve."""
    ids = BYTES.encode(text)
    slow, fast = StreamingDetokenizer(BYTES, stop), StreamingDetokenizer(BYTES, stop)
    for i in ids:
        assert (fast.fast_table is not None) == (not stop and fast._utf8.clean)
        assert fast.add_one(i) == slow.add((i,))
        assert fast.stopped == slow.stopped
    assert fast.flush() == slow.flush() and fast.text == slow.text
