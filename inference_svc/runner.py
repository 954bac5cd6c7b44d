"""Model runners: execute one batched prefill or decode step and hand back next-token logits.

The engine talks to every backend through the same three calls (`ModelRunner`):
- `prefill(slots, prompts)`: run whole prompts (past length 0) into their slots -> (B, V) logits at each
  prompt's last token;
- `decode(slots, tokens, positions)`: one new token per row, row b at position positions[b] -> (B, V);
- `release(slot)`: the slot's sequence is gone (the ORT runner drops its arrays; the torch cache is reused).

`TorchRunner` runs `GPT.forward_cached` over a preallocated `KVCache`: eager on CPU; on CUDA in bf16, with
the decode step captured as CUDA graphs at batch buckets 1, 2, 4, ..., max (static input buffers; padded
rows write into a scratch slot), as gpt-fast and vLLM do, so a decode step costs one graph launch.
`OrtRunner` (in `ort_runner.py`) runs an exported ONNX model on ONNX Runtime.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import torch

from model.kv_cache import KVCache
from model.transformer import GPT

__all__ = ["ModelRunner", "TorchRunner", "batch_buckets"]

log = logging.getLogger(__name__)

# Attention spans the decode graphs are captured at (each graph attends over a fixed number of cache
# positions; a shorter span is cheaper, so long contexts get a few graphs, not one at max_len).
_KV_BUCKET = 256


class ModelRunner(Protocol):
    """What the engine needs of a backend."""

    n_slots: int  # sequences that can be in flight at once
    max_len: int  # context length: positions 0..max_len-1
    vocab_size: int
    device: torch.device  # where returned logits live

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor: ...

    def release(self, slot: int) -> None: ...


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch (which need not be a power of two)."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


class TorchRunner:
    """`GPT.forward_cached` over a slot-addressed `KVCache` of n_slots sequences (plus one scratch slot).

    device/dtype default to the model's device and to bf16 on CUDA, the model's dtype elsewhere.
    `cuda_graphs` (default: on when the device is CUDA) captures the decode step at batch buckets up to
    `n_slots` and attention spans of 256, 512, ... up to max_len.
    """

    def __init__(
        self,
        model: GPT,
        n_slots: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config = model.config
        self.device, self.dtype = device, dtype
        self.n_slots = n_slots
        self.vocab_size = self.config.vocab_size
        self.cache = KVCache(n_slots + 1, self.config, max_len, dtype=dtype, device=device)
        self.max_len = self.cache.max_len
        self._scratch = n_slots  # padded rows of a graph bucket write here, never read by a real row
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs:
            if device.type != "cuda":
                raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
            self._capture_decode_graphs()

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Right-pad the prompts into one (B, T) batch and run it; returns float32 logits (B, V)."""
        return self.extend(slots, prompts, [0] * len(slots))

    @torch.inference_mode()
    def extend(
        self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int], *, all_logits: bool = False
    ) -> torch.Tensor:
        """Write each row's `chunks[b]` (at least one token) at positions starts[b].. of its slot, in one right-padded
        batch. Returns float32 logits at each row's last token (B, V), or at every position (B, T, V) with
        `all_logits` (the positions past a shorter row's chunk are meaningless). Prefill is extend from 0; the
        speculative decoder feeds its draft and verifies with it."""
        lengths = [len(c) for c in chunks]
        T = max(lengths)
        rows = [list(c) + [0] * (T - len(c)) for c in chunks]
        idx = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)  # (B, T)
        meta = torch.tensor([list(slots), list(starts), lengths], dtype=torch.long).to(self.device, non_blocking=True)
        kv_len = max(s + n for s, n in zip(starts, lengths))
        logits = self.model.forward_cached(
            idx, self.cache, meta[0], meta[1], meta[2], kv_len=kv_len, last_only=not all_logits
        )
        return logits.float()  # (B, V) or (B, T, V)

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One token per row; returns float32 logits (B, V)."""
        B = len(slots)
        kv_len = max(positions) + 1
        host = torch.tensor([list(slots), list(tokens), list(positions)], dtype=torch.long)  # (3, B)
        if self._graphs:
            return self._replay(host, kv_len)
        meta = host.to(self.device, non_blocking=True)
        logits = self.model.forward_cached(meta[1].view(B, 1), self.cache, meta[0], meta[2], kv_len=kv_len)
        return logits[:, 0].float()  # (B, V)

    def release(self, slot: int) -> None:
        """Nothing to free: the slot's cache rows are overwritten by its next sequence (attention never
        reads past a row's own position)."""

    # CUDA graphs -----------------------------------------------------------------------------------

    def _kv_buckets(self) -> list[int]:
        spans, s = [], _KV_BUCKET
        while s < self.max_len:
            spans.append(s)
            s *= 2
        return spans + [self.max_len]

    def _capture_decode_graphs(self) -> None:
        """Capture one decode graph per (batch bucket, attention span), largest first so that they all
        fit in one shared memory pool."""
        max_b = self.n_slots
        self._static = torch.zeros(3, max_b, dtype=torch.long, device=self.device)  # slots, tokens, positions
        self._pinned = torch.zeros(3, max_b, dtype=torch.long).pin_memory()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(batch_buckets(max_b)):
                for kv_len in reversed(self._kv_buckets()):
                    self._graphs[(b, kv_len)] = _DecodeGraph.capture(self, b, kv_len, pool)
        torch.cuda.synchronize(self.device)
        log.info("captured %d decode CUDA graphs (batch buckets %s)", len(self._graphs), batch_buckets(max_b))

    def _eager_decode_into_static(self, b: int, kv_len: int) -> torch.Tensor:
        """The decode step over the first b rows of the static buffers (what a graph records)."""
        slots, tokens, positions = self._static[0, :b], self._static[1, :b], self._static[2, :b]
        logits = self.model.forward_cached(tokens.view(b, 1), self.cache, slots, positions, kv_len=kv_len)
        return logits[:, 0].float()  # (b, V)

    def _replay(self, host: torch.Tensor, kv_len: int) -> torch.Tensor:
        B = host.shape[1]
        b = next(x for x in batch_buckets(self.n_slots) if x >= B)
        span = next(s for s in self._kv_buckets() if s >= kv_len)
        # Real rows first; padded rows decode token 0 at position 0 of the scratch slot.
        self._pinned[0, :b] = self._scratch
        self._pinned[1:, :b] = 0
        self._pinned[:, :B] = host
        self._static[:, :b].copy_(self._pinned[:, :b], non_blocking=True)
        graph = self._graphs[(b, span)]
        graph.graph.replay()
        # Copy out: the next replay overwrites the graph's output buffer.
        return graph.logits[:B].clone()


class _DecodeGraph:
    """One captured decode step and its static output buffer."""

    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> None:
        self.graph = graph
        self.logits = logits  # (b, V) float32, rewritten by each replay

    @classmethod
    def capture(cls, runner: TorchRunner, b: int, kv_len: int, pool) -> "_DecodeGraph":
        runner._static[0, :b] = runner._scratch
        runner._static[1:, :b] = 0
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):  # warm-up outside capture (allocator, cuBLAS handles, autotuning)
            for _ in range(2):
                runner._eager_decode_into_static(b, kv_len)
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = runner._eager_decode_into_static(b, kv_len)
        return cls(graph, logits)
