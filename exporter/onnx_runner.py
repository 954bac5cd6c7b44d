"""Running an exported ONNX decoder with ONNX Runtime: prefill, then decode steps feeding present -> past.

The parity checks and the CPU benchmark use this; it reads the shapes it needs from the graph itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model import onnx_contract as contract

__all__ = ["OnnxDecoder"]

Past = list[np.ndarray]  # [past_key_0, past_value_0, past_key_1, ...], each (B, Hkv, P, D) float32


class OnnxDecoder:
    """An ORT CPU session over one contract-shaped file. `threads` 0 lets ORT choose."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
