import hashlib
import io
import os
from pathlib import Path

import pytest

from trainer.corpus import (
    TINY_SHAKESPEARE_BYTES,
    TINY_SHAKESPEARE_SHA256,
    TINY_SHAKESPEARE_URL,
    CorpusError,
    download_verified,
    resolve_corpus,
)


def test_given_path_must_exist(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello")
    assert resolve_corpus(str(text), tmp_path / "cache") == text
    with pytest.raises(CorpusError, match="nope.txt"):
        resolve_corpus(str(tmp_path / "nope.txt"), tmp_path / "cache")


def test_download_from_file_url_checks_sha256(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"to be or not to be\n" * 100)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "out.txt"
    assert download_verified(src.as_uri(), dest, good, src.stat().st_size) == dest
    assert dest.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("bad", ["sha", "size"])
def test_mismatch_is_an_error_and_leaves_nothing(tmp_path, bad):
    src = tmp_path / "src.txt"
    src.write_bytes(b"abc" * 1000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    size = src.stat().st_size
    if bad == "sha":
        sha = "0" * 64
    else:
        size -= 1
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match="sha256" if bad == "sha" else "bytes"):
        download_verified(src.as_uri(), cache / "out.txt", sha, size)
    assert list(cache.iterdir()) == []


def test_default_corpus_is_fetched_once_through_opener(tmp_path):
    corpus = os.environ.get("TINYLM_CORPUS")
    if not corpus:
        pytest.skip("TINYLM_CORPUS is not set (needs the Tiny Shakespeare text)")
    data = Path(corpus).read_bytes()
    calls = []

    def opener(url):
        calls.append(url)
        return io.BytesIO(data)

    path = resolve_corpus(None, tmp_path, opener=opener)
    assert path.stat().st_size == TINY_SHAKESPEARE_BYTES
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TINY_SHAKESPEARE_SHA256
    assert resolve_corpus(None, tmp_path, opener=opener) == path  # cached: no second fetch
    assert calls == [TINY_SHAKESPEARE_URL]


def test_corrupt_default_download_is_rejected(tmp_path):
    with pytest.raises(CorpusError):
        resolve_corpus(None, tmp_path, opener=lambda url: io.BytesIO(b"x" * TINY_SHAKESPEARE_BYTES))
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "is empty"),
        (b"to be\n\xff\xfe binary \x00\x81", r"is not UTF-8 text: byte 6 \(b'\\xff'\) is invalid"),
        ("caf\u00e9".encode()[:-1], "ends inside a character"),
    ],
)
def test_a_corpus_tokenizers_cannot_read_is_refused_by_name(tmp_path, content, words):
    """Issue 22 finding 2: an empty corpus (ValueError) or a non-UTF-8 one (UnicodeDecodeError) was a traceback
    from `train`, whatever the tokenizer."""
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(content)
    with pytest.raises(CorpusError, match=words) as err:
        resolve_corpus(str(corpus), tmp_path / "cache")
    assert "corpus.bin" in str(err.value)


def test_a_directory_is_not_said_to_not_exist(tmp_path):
    """Issue 22 finding 7: a directory as corpus_path was said to "not exist"."""
    with pytest.raises(CorpusError, match="is a directory"):
        resolve_corpus(str(tmp_path), tmp_path / "cache")


def test_a_failed_download_suggests_tinylm_corpus(tmp_path):
    """Issue 22 finding 7: without network the download failed without suggesting TINYLM_CORPUS."""

    def offline(url):
        raise OSError("network is unreachable")

    with pytest.raises(CorpusError, match="set TINYLM_CORPUS"):
        resolve_corpus(None, tmp_path / "cache", opener=offline)
