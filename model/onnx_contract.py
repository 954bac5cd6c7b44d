"""The ONNX contract between the exporter and every runtime that loads its files (the ORT serving backend).

One graph per file with an explicit KV cache, as Optimum exports decoders with past_key_values:

    inputs   input_ids          int64  (batch, seq)
             past_key_{i}       float  (batch, n_kv_head, past, head_dim)    for each layer i
             past_value_{i}     float  (batch, n_kv_head, past, head_dim)
    outputs  logits             float  (batch, seq, vocab)
             present_key_{i}    float  (batch, n_kv_head, past + seq, head_dim)
             present_value_{i}  float  (batch, n_kv_head, past + seq, head_dim)

Token t of every row sits at position past + t (all rows share one past length); past = 0 (arrays of
shape (batch, n_kv_head, 0, head_dim)) is the prefill. Every file keeps float32 inputs and outputs; only
the weights differ (see `meta.json`: per file its weight dtype, size and parity gate).

Beside each file, a fixed-KV graph (`FIXED_KV_FILES`; meta.json's `fixed_kv`) whose cache the host owns and
updates in place, so a decode step does not copy the whole cache (issue 17):

    inputs   input_ids          int64  (batch, seq)
             past_lengths       int64  (batch,)                               tokens already in each row's buffer
             cache_key_{i}      float  (batch, n_kv_head, cache, head_dim)    the buffers, read in place
             cache_value_{i}    float  (batch, n_kv_head, cache, head_dim)
    outputs  logits             float  (batch, seq, vocab)
             new_key_{i}        float  (batch, n_kv_head, seq, head_dim)      to write at [past_lengths[b], + seq)
             new_value_{i}      float  (batch, n_kv_head, seq, head_dim)

Row b's token t sits at position past_lengths[b] + t, so rows at different lengths run in one call. `cache` is the
buffers' capacity, at least max(past_lengths); max_len = block_size is all a host ever needs. Attention reads the
whole capacity every step (masked), so a host may keep max_len buffers or grow them as its sequences do
(`cache_capacity`: the ORT backend doubles them).

INT8 also has a small-batch twin of its fixed-KV graph (`SMALL_BATCH_FILES`; meta.json's `fixed_kv.small_batch`
under the variant): the same inputs and outputs, the weights quantized for calls of a row or two (weight-only 8-bit
`MatMulNBits`), which ORT runs faster than the dynamic INT8 file at one or two token rows and slower at more
(inference_svc/PERF_NOTES.md 14). A host may run each call on either file; the ORT backend takes the twin for calls
of at most 2 token rows.
This module has no dependencies beyond the standard library, so a runtime can import it alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "CONTRACT_VERSION",
    "ONNX_DIR",
    "META_FILE",
    "VARIANT_FILES",
    "FIXED_KV_FILES",
    "SMALL_BATCH_FILES",
    "PAST_LENGTHS",
    "INPUT_IDS",
    "LOGITS",
    "IO_DTYPE",
    "AXIS_BATCH",
    "AXIS_SEQ",
    "AXIS_PAST",
    "AXIS_CACHE",
    "past_key_name",
    "past_value_name",
    "present_key_name",
    "present_value_name",
    "input_names",
    "output_names",
    "fixed_kv_input_names",
    "fixed_kv_output_names",
    "cache_capacity",
    "read_meta",
]

CONTRACT_VERSION = 1
ONNX_DIR = "onnx"  # inside the artifact folder
META_FILE = "meta.json"  # inside ONNX_DIR
# Variant -> file name inside ONNX_DIR.
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "fp16": "model-fp16.onnx",
    "int8": "model-int8.onnx",
    "int4": "model-int4.onnx",
}
# Variant -> its fixed-KV graph's file name inside ONNX_DIR (the files above keep their names).
FIXED_KV_FILES: dict[str, str] = {
    "fp32": "model-fixedkv.onnx",
    "fp16": "model-fixedkv-fp16.onnx",
    "int8": "model-fixedkv-int8.onnx",
    "int4": "model-fixedkv-int4.onnx",
}
# Variant -> the small-batch twin of its fixed-KV graph, inside ONNX_DIR (same I/O; weights quantized for 1-2 rows).
SMALL_BATCH_FILES: dict[str, str] = {"int8": "model-fixedkv-int8-small-batch.onnx"}
INPUT_IDS = "input_ids"
PAST_LENGTHS = "past_lengths"
LOGITS = "logits"
IO_DTYPE = "float32"  # dtype of past_*, present_* and logits in every variant
AXIS_BATCH, AXIS_SEQ, AXIS_PAST = "batch", "seq", "past"
AXIS_CACHE = "cache"  # the fixed-KV graph's buffer capacity


def past_key_name(layer: int) -> str:
    return f"past_key_{layer}"


def past_value_name(layer: int) -> str:
    return f"past_value_{layer}"


def present_key_name(layer: int) -> str:
    return f"present_key_{layer}"


def present_value_name(layer: int) -> str:
    return f"present_value_{layer}"


def input_names(n_layer: int) -> list[str]:
    """input_ids, then past_key_i, past_value_i for each layer, in graph order."""
    return [INPUT_IDS] + [n for i in range(n_layer) for n in (past_key_name(i), past_value_name(i))]


def output_names(n_layer: int) -> list[str]:
    """logits, then present_key_i, present_value_i for each layer, in graph order."""
    return [LOGITS] + [n for i in range(n_layer) for n in (present_key_name(i), present_value_name(i))]


def fixed_kv_input_names(n_layer: int) -> list[str]:
    """input_ids, past_lengths, then cache_key_i, cache_value_i for each layer, in graph order."""
    return [INPUT_IDS, PAST_LENGTHS] + [f"cache_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]


def fixed_kv_output_names(n_layer: int) -> list[str]:
    """logits, then new_key_i, new_value_i for each layer, in graph order."""
    return [LOGITS] + [f"new_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]


def cache_capacity(needed: int, max_len: int, smallest: int = 32) -> int:
    """The fixed-KV buffer capacity for `needed` tokens: the power of two >= needed (at least `smallest`), at most
    max_len. Doubling keeps the copies on growth rare, and a short sequence's attention reads a short buffer."""
    return min(max_len, max(smallest, 1 << max(0, needed - 1).bit_length()))


def read_meta(artifact_dir: str | Path) -> dict[str, Any]:
    """`<artifact>/onnx/meta.json` as a dict: n_layer, n_kv_head, head_dim, vocab_size, block_size, files."""
    return json.loads((Path(artifact_dir) / ONNX_DIR / META_FILE).read_text())
