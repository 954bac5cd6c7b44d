"""Token data for training: the corpus tokenized once into memory-mapped train/val .bin files, and random windows.

As nanoGPT's `prepare.py` + `get_batch`: the last 10% of the tokens are validation; a batch is B random
windows of block_size + 1 tokens. Here the windows come from a seeded `numpy.random.Generator` whose state
is part of the resume state, and every rank draws the same global batch and takes its own rows, so one
process with batch B and W processes with B / W each see exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, load_tokenizer

__all__ = ["TokenData", "prepare_data", "WindowSampler", "get_batch", "BatchLoader", "VAL_FRACTION"]

VAL_FRACTION = 0.1
DEVICE_RESIDENT_MAX_BYTES = 1 << 30  # a split up to this size (as int64) lives on the GPU; larger ones stay on the host
_FORMAT = 1  # bump when the cached layout changes


@dataclass
class TokenData:
    """Tokenized corpus: train and val token arrays (memory-mapped, read-only) and the tokenizer that made them."""

    train: np.ndarray  # (N_train,) uint16 or uint32
    val: np.ndarray  # (N_val,)
    tokenizer: Any
    folder: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _cache_key(corpus: Path, tokenizer: str, bpe_vocab: int) -> str:
    digest = hashlib.sha256()
    with corpus.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    vocab = bpe_vocab if tokenizer == "bpe" else 0
    return f"{tokenizer}{vocab or ''}-{digest.hexdigest()[:16]}-v{_FORMAT}"


def _build_tokenizer(kind: str, text: str, bpe_vocab: int) -> Any:
    if kind == "char":
        return CharTokenizer.from_corpus(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(text, bpe_vocab)
    raise ValueError(f"tokenizer must be one of ['char', 'byte', 'bpe'], got {kind!r}")


def prepare_data(corpus: Path, tokenizer: str, cache_dir: Path, *, bpe_vocab: int = 4096) -> TokenData:
    """Tokenize `corpus` once into `cache_dir/<key>/{train.bin, val.bin, tokenizer.json, meta.json}`; reuse it after.

    The key covers the corpus bytes and the tokenizer choice; the folder appears atomically (built beside, renamed).
    """
    corpus = Path(corpus)
    folder = Path(cache_dir) / _cache_key(corpus, tokenizer, bpe_vocab)
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _write_bins(corpus, tokenizer, bpe_vocab, tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process (rank) finished first: use theirs
                if not (folder / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _open(folder)


def _write_bins(corpus: Path, kind: str, bpe_vocab: int, out: Path) -> None:
    text = corpus.read_text(encoding="utf-8")
    tok = _build_tokenizer(kind, text, bpe_vocab)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    ids = np.asarray(tok.encode(text), dtype=dtype)  # (N,)
    n_val = max(1, int(len(ids) * VAL_FRACTION))
    ids[:-n_val].tofile(out / "train.bin")
    ids[-n_val:].tofile(out / "val.bin")
    tok.save(out / "tokenizer.json")
    meta = {
        "corpus": str(corpus),
        "tokenizer": kind,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "n_train": int(len(ids) - n_val),
        "n_val": int(n_val),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def _open(folder: Path) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text())
    train = np.memmap(folder / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r")
    return TokenData(train=train, val=val, tokenizer=load_tokenizer(folder / "tokenizer.json"), folder=folder)


class WindowSampler:
    """Random window starts from a seeded generator; its state (JSON-able) resumes the exact sequence."""

    def __init__(self, n_tokens: int, block_size: int, seed: int):
        if n_tokens <= block_size:
            raise ValueError(
                f"block_size must be below the split's {n_tokens} tokens, got {block_size} (use a longer corpus)"
            )
        self.high = n_tokens - block_size  # a window is [i, i + block_size], inclusive of the target token
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def next_offsets(self, batch_size: int) -> np.ndarray:
        """(batch_size,) int64 window starts for the next global batch."""
        self.batches_drawn += 1
        return self.rng.integers(0, self.high, size=batch_size, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state["batches_drawn"])


def get_batch(
    data: np.ndarray, offsets: np.ndarray, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y (each (B, T) int64, y shifted by one) for windows starting at `offsets` (B,)."""
    rows = np.stack([np.asarray(data[i : i + block_size + 1], dtype=np.int64) for i in offsets])  # (B, T+1)
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        # pinned host memory lets the copy overlap with compute, as in nanoGPT
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


class BatchLoader:
    """`get_batch` for one split, without a host sync: on a GPU the split lives in device memory (it is small: Tiny
    Shakespeare is 8 MB as int64), so a batch costs one 8-bytes-per-row copy of the window starts from pinned memory
    (`non_blocking`: the CPU never waits for the GPU to fetch it) and one gather on the device. The rows are exactly
    `get_batch`'s. Splits over DEVICE_RESIDENT_MAX_BYTES, and CPU runs, take `get_batch` itself.
    """

    def __init__(
        self, data: np.ndarray, block_size: int, device: torch.device, *, resident: bool | None = None
    ) -> None:
        """`resident`: keep the split on `device` (None: on a GPU, when it fits DEVICE_RESIDENT_MAX_BYTES)."""
        self.data, self.block_size, self.device = data, block_size, device
        self.tokens: torch.Tensor | None = None  # (N,) int64 on the device, when resident
        self._generator: torch.Generator | None = None  # `noised`'s draws on the device
        if resident is None:
            resident = device.type == "cuda" and len(data) * 8 <= DEVICE_RESIDENT_MAX_BYTES
        if resident:
            self.tokens = torch.from_numpy(np.asarray(data, dtype=np.int64)).to(device)
            self.window = torch.arange(block_size + 1, device=device)  # (T+1,)

    def __call__(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (B, T) int64 for windows starting at `offsets` (B,)."""
        if self.tokens is None:
            return get_batch(self.data, offsets, self.block_size, self.device)
        starts = torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.int64))
        if self.device.type == "cuda":
            starts = starts.pin_memory().to(self.device, non_blocking=True)  # (B,)
        rows = self.tokens[starts[:, None] + self.window]  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]

    def noised(self, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        """`x` with each token, with probability `p`, replaced by the token at a uniformly random position of this
        split: a draw from the split's unigram distribution (data noising, Xie et al. 2017). The draws depend on
        `seed` alone (a resumed run draws what the uninterrupted one did); no host sync on a GPU."""
        if self.tokens is not None:  # on the device: the draws too (a generator there, seeded without a sync)
            if self._generator is None:
                self._generator = torch.Generator(device=x.device)
            gen = self._generator.manual_seed(seed)
            replace = torch.rand(x.shape, device=x.device, generator=gen) < p
            picks = self.tokens[torch.randint(0, len(self.tokens), x.shape, device=x.device, generator=gen)]
            return torch.where(replace, picks, x)
        rng = np.random.Generator(np.random.PCG64(seed))
        replace = torch.from_numpy(rng.random(x.shape) < p)
        picks = torch.from_numpy(np.asarray(self.data[rng.integers(0, len(self.data), x.numel())], dtype=np.int64))
        return torch.where(replace.to(x.device), picks.view(x.shape).to(x.device), x)
