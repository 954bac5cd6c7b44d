"""Tests of the tokenizers: corpus round-trips, unknown characters, JSON save/load, streaming decode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    IncrementalDecoder,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)

SAMPLE = "héllo wörld ☃ 日本語\n\tend — ok?\r\n"


@pytest.fixture(scope="module")
def corpus() -> str:
    path = os.environ.get("TINYLM_CORPUS")
    if not path:
        pytest.skip("TINYLM_CORPUS is not set (export TINYLM_CORPUS=/path/to/tinyshakespeare.txt)")
    return Path(path).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    return BPETokenizer.train(corpus[:100_000], vocab_size=400)


def test_char_round_trips_corpus(corpus, tmp_path):
    tok = CharTokenizer.from_corpus(corpus)
    assert tok.vocab_size == 65  # Tiny Shakespeare's characters, as in nanoGPT
    ids = tok.encode(corpus)
    assert len(ids) == len(corpus) and max(ids) == 64
    assert tok.decode(ids) == corpus
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.encode(corpus[:5000]) == ids[:5000]


def test_byte_round_trips_corpus_and_unicode(corpus):
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    for text in (corpus, SAMPLE):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("☃")) == 3


def test_bpe_round_trips_corpus_and_unseen_text(corpus, bpe, tmp_path):
    assert bpe.vocab_size == 400
    ids = bpe.encode(corpus)
    assert len(ids) < 0.7 * len(corpus)  # merges compress
    assert bpe.decode(ids) == corpus
    assert bpe.decode(bpe.encode(SAMPLE)) == SAMPLE  # unseen characters fall back to bytes
    assert bpe.decode_bytes(bpe.encode(SAMPLE)) == SAMPLE.encode("utf-8")
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    again = load_tokenizer(path)
    assert isinstance(again, BPETokenizer) and again.encode(corpus[:20000]) == bpe.encode(corpus[:20000])


def test_char_unknown_character_error_or_unk():
    strict = CharTokenizer.from_corpus("abc ")
    with pytest.raises(ValueError, match=r"character 'z' at position 2 is not in the tokenizer's vocabulary"):
        strict.encode("abz")
    lenient = CharTokenizer.from_corpus("abc ", unk=True)
    assert lenient.vocab_size == 5
    ids = lenient.encode("abz")
    assert ids == [0 + 1, 1 + 1, 4]  # ' ' sorts first; <unk> is the last id
    assert lenient.decode(ids) == "ab<unk>"
    assert tokenizer_from_json(lenient.to_json()).encode("abz") == ids


def test_protocol_and_json_errors():
    for tok in (CharTokenizer.from_corpus("ab"), ByteTokenizer()):
        assert isinstance(tok, Tokenizer)
    with pytest.raises(ValueError, match="tokenizer type must be one of"):
        tokenizer_from_json('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        tokenizer_from_json("{")
    with pytest.raises(ValueError, match=r"token id must be in \[0, 256\)"):
        ByteTokenizer().decode([300])


def test_incremental_decoder_never_splits_characters():
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in tok.encode(SAMPLE)]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + dec.flush() == SAMPLE
    cut = IncrementalDecoder(tok)
    assert cut.push(tok.encode("☃")[:2]) == "" and cut.flush() == "\ufffd"


def test_bpe_streaming(bpe):
    dec = IncrementalDecoder(bpe)
    out = "".join(dec.push([i]) for i in bpe.encode(SAMPLE)) + dec.flush()
    assert out == SAMPLE


def test_bpe_vocab_size_validated():
    with pytest.raises(ValueError, match=r"vocab_size must be an integer in \[256,"):
        BPETokenizer.train("abc", vocab_size=100)
