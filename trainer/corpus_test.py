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
