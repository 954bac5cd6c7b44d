"""Tokenizers: character-level, byte-level (256) and byte-level BPE, saved as one `tokenizer.json`.

The file is `{"type": "char" | "byte" | "bpe", ...}`; a BPE file embeds the Hugging Face `tokenizers`
JSON under "hf", so exporters can hand it to other runtimes unchanged (`BPETokenizer.hf_json()`).
Every tokenizer has `decode_bytes(ids)`: the raw UTF-8 of the tokens, which `IncrementalDecoder`
turns into text as it streams, never splitting a multi-byte character.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.field_checks import check_int

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "IncrementalDecoder",
    "load_tokenizer",
    "tokenizer_from_json",
    "TOKENIZER_FILE",
]

TOKENIZER_FILE = "tokenizer.json"
UNK = "<unk>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer, generator and servers need from any tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...

    def to_json(self) -> str: ...

    def save(self, path: str | Path) -> None: ...


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id must be in [0, {vocab_size}), got {i}")


class _SaveMixin:
    def save(self, path: str | Path) -> None:
        """Write `to_json()` to `path` (a file, or a directory that gets `tokenizer.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")  # type: ignore[attr-defined]


class CharTokenizer(_SaveMixin):
    """One token per Unicode character, the vocabulary being the corpus's sorted characters (nanoGPT).

    With `unk=True` an extra last id stands for any character outside the vocabulary and decodes as
    "<unk>"; without it such a character raises ValueError naming it.
    """

    def __init__(self, chars: Sequence[str], unk: bool = False) -> None:
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct single characters")
        self.chars = list(chars)
        self.unk = unk
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_corpus(cls, text: str, unk: bool = False) -> "CharTokenizer":
        """Vocabulary = sorted set of the characters in `text`."""
        if not text:
            raise ValueError("text must not be empty to build a character vocabulary")
        return cls(sorted(set(text)), unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (1 if self.unk else 0)

    def encode(self, text: str) -> list[int]:
        unk_id = len(self.chars)
        ids = []
        for pos, c in enumerate(text):
            i = self._stoi.get(c)
            if i is None:
                if not self.unk:
                    raise ValueError(
                        f"character {c!r} at position {pos} is not in the tokenizer's vocabulary of "
                        f"{len(self.chars)} characters (build it with unk=True to map it to {UNK})"
                    )
                i = unk_id
            ids.append(i)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self.vocab_size)
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else UNK for i in ids)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": "".join(self.chars), "unk": self.unk}, ensure_ascii=False)


class ByteTokenizer(_SaveMixin):
    """The 256 byte values of the UTF-8 encoding; any text encodes, nothing is unknown."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        _check_ids(ids, 256)
        return bytes(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Invalid UTF-8 (e.g. a cut multi-byte character) decodes as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": "byte"})


@lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class BPETokenizer(_SaveMixin):
    """Byte-level BPE (GPT-2 style) trained with Hugging Face `tokenizers`; round-trips any text."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        self._vocab_size = hf.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Learn merges on `text` up to `vocab_size` tokens (>= 256: the byte alphabet comes first)."""
        check_int("vocab_size", vocab_size, 256, 1 << 20)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        hf.train_from_iterator(text.splitlines(keepends=True), trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Invalid UTF-8 (e.g. a cut multi-byte character) decodes as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        _check_ids(ids, self._vocab_size)
        table = _byte_level_decoding()
        return bytes(table[c] for i in ids for c in self.hf.id_to_token(i))

    def hf_json(self) -> str:
        """The Hugging Face `tokenizers` JSON (loadable by `tokenizers.Tokenizer.from_str`)."""
        return self.hf.to_str()

    def to_json(self) -> str:
        return json.dumps({"type": "bpe", "hf": json.loads(self.hf.to_str())}, ensure_ascii=False)


class IncrementalDecoder:
    """Streams token ids into text: `push(ids)` returns the newly complete text, holding back the bytes
    of a multi-byte character until its last byte arrives; `flush()` returns what is left (U+FFFD for
    an incomplete character)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._texts = piece_texts(tokenizer)
        self.clean = True  # no partial character held back

    def push(self, ids: Sequence[int]) -> str:
        if self.clean and len(ids) == 1:  # the serving engine's case: one token, whole characters
            i = ids[0]
            text = self._texts[i] if 0 <= i < len(self._texts) else None
            if text is not None:
                return text
        text = self._utf8.decode(self.tokenizer.decode_bytes(ids))
        self.clean = not self._utf8.getstate()[0]
        return text

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def piece_texts(tokenizer: Tokenizer) -> list[str | None]:
    """Each id's text when its bytes are whole UTF-8 characters on their own (None where a token ends or starts
    mid-character), built once per tokenizer: a token then decodes with one list lookup."""
    texts = getattr(tokenizer, "_piece_texts", None)
    if texts is None:
        texts = []
        for i in range(tokenizer.vocab_size):
            try:
                texts.append(tokenizer.decode_bytes([i]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                texts.append(None)
        tokenizer._piece_texts = texts
    return texts


def tokenizer_from_json(s: str) -> CharTokenizer | ByteTokenizer | BPETokenizer:
    """Rebuild a tokenizer from `to_json()` output."""
    try:
        d: Any = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer JSON is not valid JSON: {e}") from None
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "char":
        return CharTokenizer(list(d["chars"]), unk=bool(d.get("unk", False)))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(HFTokenizer.from_str(json.dumps(d["hf"])))
    raise ValueError(f"tokenizer type must be one of ['char', 'byte', 'bpe'], got {kind!r}")


def load_tokenizer(path: str | Path) -> CharTokenizer | ByteTokenizer | BPETokenizer:
    """Load `path` (a tokenizer.json, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return tokenizer_from_json(path.read_text(encoding="utf-8"))
