"""Running an exported ONNX decoder with ONNX Runtime: prefill, then decode steps feeding present -> past, or
(the fixed-KV graph) writing each step's new K/V into host buffers.

The parity checks and the CPU benchmark use this; it reads the shapes it needs from the graph itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model import onnx_contract as contract

__all__ = ["OnnxDecoder", "FixedKVOnnxDecoder", "FixedPast", "open_decoder"]

Past = list[np.ndarray]  # [past_key_0, past_value_0, past_key_1, ...], each (B, Hkv, P, D) float32


def _session(path: str | Path, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def open_decoder(path: str | Path, threads: int = 0) -> OnnxDecoder | FixedKVOnnxDecoder:
    """The decoder for the graph in `path`: `FixedKVOnnxDecoder` when it takes past_lengths, else `OnnxDecoder`."""
    session = _session(path, threads)
    fixed = any(i.name == contract.PAST_LENGTHS for i in session.get_inputs())
    return FixedKVOnnxDecoder(session) if fixed else OnnxDecoder(session)


class OnnxDecoder:
    """An ORT CPU session over one contract-shaped file (a path, or a session already open). `threads` 0 lets ORT
    choose."""

    def __init__(self, path: str | Path | Any, threads: int = 0) -> None:
        self.session = _session(path, threads) if isinstance(path, (str, Path)) else path
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.n_layer = sum(1 for name in inputs if name.startswith("past_key_"))
        _, self.n_kv_head, _, self.head_dim = inputs[contract.past_key_name(0)].shape
        self._outputs = contract.output_names(self.n_layer)

    def empty_past(self, batch: int) -> Past:
        """Zero-length past for a prefill."""
        shape = (batch, self.n_kv_head, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.n_layer)]

    def step(self, input_ids: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """input_ids (B, T) int64 at positions P..P+T-1 -> logits (B, T, V), present (length P + T)."""
        feed = {contract.INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64)}
        for i in range(self.n_layer):
            feed[contract.past_key_name(i)] = past[2 * i]
            feed[contract.past_value_name(i)] = past[2 * i + 1]
        logits, *present = self.session.run(self._outputs, feed)
        return logits, present

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, Past]:
        """Run a prompt (B, T) from an empty cache."""
        return self.step(input_ids, self.empty_past(input_ids.shape[0]))


@dataclass
class FixedPast:
    """The fixed-KV graph's cache as the host holds it: buffers [key_0, value_0, ...] (B, Hkv, capacity, D) float32,
    written in place (and grown, doubling, when a step needs more room), and the tokens each row holds (B,) int64."""

    buffers: list[np.ndarray]
    lengths: np.ndarray


class FixedKVOnnxDecoder:
    """`OnnxDecoder`'s prefill / step over a fixed-KV graph (an open session): the past is a `FixedPast`."""

    def __init__(self, session: Any) -> None:
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self._inputs = [i.name for i in session.get_inputs()]
        self._outputs = [o.name for o in session.get_outputs()]
        self.n_layer = (len(self._inputs) - 2) // 2
        _, self.n_kv_head, _, self.head_dim = inputs[self._inputs[2]].shape

    def empty_past(self, batch: int, capacity: int = 1) -> FixedPast:
        shape = (batch, self.n_kv_head, capacity, self.head_dim)
        return FixedPast([np.zeros(shape, np.float32) for _ in range(2 * self.n_layer)], np.zeros(batch, np.int64))

    def step(self, input_ids: np.ndarray, past: FixedPast) -> tuple[np.ndarray, FixedPast]:
        """input_ids (B, T) at positions past.lengths + t -> logits (B, T, V); the new K/V go into past's buffers."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        seq = ids.shape[1]
        needed = int(past.lengths.max()) + seq
        if needed > past.buffers[0].shape[2]:
            grown = self.empty_past(len(past.lengths), 1 << (needed - 1).bit_length()).buffers
            for new_buffer, old in zip(grown, past.buffers):
                new_buffer[:, :, : old.shape[2]] = old
            past.buffers = grown
        feed = dict(zip(self._inputs, [ids, past.lengths, *past.buffers]))
        logits, *new = self.session.run(self._outputs, feed)  # 2 * n_layer x (B, Hkv, T, D)
        for buffer, rows in zip(past.buffers, new):
            for b, start in enumerate(past.lengths):
                buffer[b, :, start : start + seq] = rows[b]
        past.lengths = past.lengths + seq
        return logits, past

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, FixedPast]:
        return self.step(input_ids, self.empty_past(input_ids.shape[0]))
