"""Where the training text comes from: a given file, or Tiny Shakespeare fetched once and checked by sha256.

The download is written to a temporary file beside its destination and renamed into place only after
its size and sha256 match, so a cache never holds a partial or wrong corpus.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TINY_SHAKESPEARE_URL",
    "TINY_SHAKESPEARE_SHA256",
    "TINY_SHAKESPEARE_BYTES",
    "CorpusError",
    "resolve_corpus",
    "check_text",
    "download_verified",
]

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1_115_394
_CHUNK = 1 << 16

Opener = Callable[[str], BinaryIO]


class CorpusError(RuntimeError):
    """The corpus is missing, unreadable, or failed its checksum."""


def resolve_corpus(path: str | Path | None, cache_dir: Path, *, opener: Opener | None = None) -> Path:
    """The corpus file to train on: `path` if given (it must exist), else Tiny Shakespeare in `cache_dir`.

    `opener(url) -> binary file object` fetches the download (default `urllib.request.urlopen`); tests pass their own.
    """
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            raise CorpusError(f"corpus_path {str(p)!r} is a directory; give a UTF-8 text file")
        if not p.is_file():
            raise CorpusError(f"corpus_path {str(p)!r} does not exist")
        check_text(p)
        return p
    dest = Path(cache_dir) / "tinyshakespeare.txt"
    if dest.is_file() and dest.stat().st_size == TINY_SHAKESPEARE_BYTES and _sha256(dest) == TINY_SHAKESPEARE_SHA256:
        return dest
    return download_verified(TINY_SHAKESPEARE_URL, dest, TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_BYTES, opener=opener)


def check_text(path: Path) -> None:
    """Refuse a corpus that tokenizers cannot train on: an empty file, or one that is not UTF-8 text (checked
    in chunks, so a large corpus is never held in memory twice)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"corpus_path {str(path)!r} is not UTF-8 text: byte {n + err.start} ({chunk[err.start : err.start + 1]!r}) "
                    "is invalid; give a plain text file"
                ) from None
            n += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusError(f"corpus_path {str(path)!r} is not UTF-8 text: it ends inside a character") from None
    if n == 0:
        raise CorpusError(f"corpus_path {str(path)!r} is empty; a corpus needs at least some text")


def download_verified(url: str, dest: Path, sha256: str, size: int, *, opener: Opener | None = None) -> Path:
    """Fetch `url` to `dest` atomically; a wrong size or sha256 raises CorpusError and leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, (opener or _urlopen)(url) as src:
            while chunk := src.read(_CHUNK):
                n += len(chunk)
                if n > size:
                    raise CorpusError(f"download of {url} is larger than the expected {size} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if n != size:
            raise CorpusError(f"download of {url} has {n} bytes, expected {size}")
        if digest.hexdigest() != sha256:
            raise CorpusError(f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CorpusError(
                f"could not download the corpus from {url}: {err}; without network, set TINYLM_CORPUS to a local "
                "copy of the text (e.g. TINYLM_CORPUS=/path/to/tinyshakespeare.txt)"
            ) from err
        raise
    return dest


def _urlopen(url: str) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (fixed https URL, or file:// in tests)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
