"""The ONNX Runtime backend: runs an exported decoder (`<artifact>/onnx/model*.onnx`) behind the same
`ModelRunner` calls as the torch backend.

The exported graph has an explicit KV cache (the exporter's contract): inputs `input_ids` (batch, seq) and
per layer `past_key_i` / `past_value_i` (batch, n_kv_head, past, head_dim); outputs `logits` and
`present_key_i` / `present_value_i` (batch, n_kv_head, past + seq, head_dim). All rows of one call share one
past length, so this runner keeps each sequence's arrays itself and batches only sequences of equal length
(prompts of equal length in a prefill, sequences at the same position in a decode); the rest run in
their own calls. Names and shapes are read at run time from `<artifact>/onnx/meta.json`, the artifact's
`config.json` and the graph, never from the exporter's code.

When the artifact has the variant's fixed-KV graph (meta.json `files.<variant>.fixed_kv`), the runner uses it
instead: per layer one pool (n_slots, n_kv_head, capacity, head_dim) that the runner owns, slot s at row s. A call
feeds the pool's rows from the lowest to the highest slot it touches (a view: no copy) with each row's
`past_lengths`, so rows at any positions run together, and writes the returned new K/V into the pool in place; a
decode step no longer copies the whole cache (inference_svc/PERF_NOTES.md 12-13). Rows of that span that are not
in the call run on a dummy token and are dropped. The graph's attention reads the whole capacity every step, so
the capacity follows the longest live sequence (`onnx_contract.cache_capacity`: doubling up to max_len; the live
sequences' K/V move when it grows, or shrinks on a release, within buffers allocated once for max_len).
INT8's fixed-KV graph has a small-batch twin (meta.json `fixed_kv.small_batch`: weight-only 8-bit MatMulNBits, faster
at one or two token rows and slower at more, PERF_NOTES 14): calls of at most SMALL_BATCH_MAX_TOKENS token rows run on
it, the rest on the fixed-KV file. Both read and write the same pool. Its speed rests on the CPU having ORT's int8
kernel for MatMulNBits, so by default the runner times one token on each file at start and keeps the twin only if
it is the faster there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.config import ModelConfig
from model.onnx_contract import cache_capacity

__all__ = ["OrtRunner", "onnx_file", "ONNX_VARIANTS", "SMALL_BATCH_MAX_TOKENS"]

log = logging.getLogger(__name__)

ONNX_DIR, META_FILE = "onnx", "meta.json"
ONNX_VARIANTS = ("fp32", "fp16", "int8", "int4")
# Calls of at most this many token rows (span rows x tokens per row) run on the small-batch twin. On this repo's 2-core
# VM (PERF_NOTES 14) the twin takes 0.64 vs 1.02 ms at 1 row, 1.01 vs 1.44 at 2, ties at 3 and loses from 4 rows on.
SMALL_BATCH_MAX_TOKENS = 2


def _read_meta(artifact_dir: Path) -> dict[str, Any]:
    path = artifact_dir / ONNX_DIR / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def onnx_file(artifact_dir: str | Path, variant: str = "fp32") -> Path:
    """The ONNX file of `variant` in an artifact: meta.json's entry for it, else `model.onnx` (fp32) or
    `model-<variant>.onnx`. FileNotFoundError lists what is there."""
    artifact_dir = Path(artifact_dir)
    folder = artifact_dir / ONNX_DIR
    entry = _read_meta(artifact_dir).get("files", {}).get(variant)
    name = entry.get("file") if isinstance(entry, dict) else entry if isinstance(entry, str) else None
    candidates = (
        [name] if name else ["model.onnx" if variant == "fp32" else f"model-{variant}.onnx", f"model_{variant}.onnx"]
    )
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    have = sorted(p.name for p in folder.glob("model*.onnx")) if folder.is_dir() else []
    raise FileNotFoundError(
        f"no ONNX file for variant {variant!r} in {folder} (found: {have or 'none'}); "
        f"export it first: ./tinylm export --model {artifact_dir.name}"
    )


def _open_session(path: Path, options: Any) -> Any:
    """An ORT CPU session of `path`; ValueError naming the file when it does not load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # InvalidProtobuf, Fail, ...: a corrupt or truncated file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {reason})") from None


def _call_ms(session: Any, outputs: list[str], feed: dict[str, np.ndarray], warm: int = 2, timed: int = 5) -> float:
    """The fastest of `timed` calls of session.run(outputs, feed), in ms, after `warm` untimed ones."""
    for _ in range(warm):
        session.run(outputs, feed)
    best = math.inf
    for _ in range(timed):
        t0 = time.perf_counter()
        session.run(outputs, feed)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


class OrtRunner:
    """An ORT CPU session plus per-slot KV arrays for up to n_slots sequences.

    Pass the artifact folder (config.json gives the shapes) and the variant (fp32, fp16, int8, int4);
    `threads` 0 lets ORT choose its intra-op threads. `fixed_kv` None uses the variant's fixed-KV graph when the
    export made one, True requires it, False keeps the past -> present graph. `small_batch` likewise for the fixed-KV
    graph's small-batch twin (INT8), used for calls of at most SMALL_BATCH_MAX_TOKENS token rows; None uses it only if
    a one-token call measures faster on it than on the fixed-KV file here, at start (`small_batch_check`).
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        n_slots: int,
        *,
        variant: str = "fp32",
        threads: int = 0,
        fixed_kv: bool | None = None,
        small_batch: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        artifact_dir = Path(artifact_dir)
        config = ModelConfig.from_dict(json.loads((artifact_dir / "config.json").read_text()))
        meta = _read_meta(artifact_dir)
        entry = meta.get("files", {}).get(variant, {})
        fixed_entry = entry.get("fixed_kv") if isinstance(entry, dict) else None
        self.fixed_kv = fixed_entry is not None and fixed_kv is not False
        if fixed_kv and not self.fixed_kv:
            raise FileNotFoundError(
                f"no fixed-KV graph for variant {variant!r} in {artifact_dir / ONNX_DIR} (meta.json has none); "
                f"re-export it: ./tinylm export --model {artifact_dir.name}"
            )
        self.path = artifact_dir / ONNX_DIR / fixed_entry["file"] if self.fixed_kv else onnx_file(artifact_dir, variant)
        gate = fixed_entry.get("gate") if self.fixed_kv else entry.get("gate") if isinstance(entry, dict) else None
        if gate == "failed":
            log.warning("%s failed its parity gate at export time; serving it anyway, as asked", self.path)
        self.n_slots = n_slots
        self.n_layer, self.n_kv_head, self.head_dim = config.n_layer, config.n_kv_head, config.head_dim
        self.vocab_size = config.vocab_size
        self.max_len = config.block_size
        self.device = torch.device("cpu")

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = _open_session(self.path, options)
        self._inputs, self._outputs = self._io_names(meta.get("fixed_kv", {}) if self.fixed_kv else meta)
        self._check_io(self.session, self.path)
        # the fixed-KV graph's small-batch twin, for calls of <= SMALL_BATCH_MAX_TOKENS token rows (same inputs/outputs)
        self.small_batch_path, self.small_batch_session = self._small_batch(
            fixed_entry if self.fixed_kv else None, small_batch, artifact_dir, variant, options
        )
        self._kv: dict[int, list[np.ndarray]] = {}  # slot -> [k_0, v_0, k_1, v_1, ...], each (1, Hkv, past, D)
        self._past: dict[int, int] = {}  # slot -> past length
        # fixed-KV: per k_0, v_0, k_1, ... one flat buffer sized for max_len, allocated once; `_pool` views its head
        # as (n_slots, Hkv, capacity, D), slot s at row s (contiguous at any capacity, so ORT reads it in place)
        self._flat: list[np.ndarray] = []
        self._pool: list[np.ndarray] = []
        if self.fixed_kv:
            size = n_slots * self.n_kv_head * self.max_len * self.head_dim
            self._flat = [np.zeros(size, dtype=np.float32) for _ in range(2 * self.n_layer)]
            self._resize_pool(cache_capacity(0, self.max_len))
        # (twin ms, file ms) for one token on this machine, when `small_batch` None left the choice to the runner
        self.small_batch_check: tuple[float, float] | None = None
        if small_batch is None and self.small_batch_session is not None:
            self._keep_small_batch_if_faster()

    def _keep_small_batch_if_faster(self) -> None:
        """Time a one-token call (a row at position 0, nothing written to the pool) on the twin and on the fixed-KV
        file, and drop the twin unless it is the faster here: its speed rests on MLAS's int8 MatMulNBits kernel
        (~0.5 ms a step on this repo's x86 CPU); without one ORT dequantizes the weights every call (~15 ms)."""
        feed = dict(
            zip(self._inputs, [np.zeros((1, 1), np.int64), np.zeros(1, np.int64), *(b[:1] for b in self._pool)])
        )
        twin = _call_ms(self.small_batch_session, self._outputs, feed)
        main = _call_ms(self.session, self._outputs, feed)
        self.small_batch_check = (twin, main)
        if twin >= main:
            log.info("%s: %.3f ms a token against %.3f without it here; not used", self.small_batch_path, twin, main)
            self.small_batch_path, self.small_batch_session = None, None

    def _small_batch(
        self, fixed_entry: dict[str, Any] | None, wanted: bool | None, artifact_dir: Path, variant: str, options: Any
    ) -> tuple[Path | None, Any]:
        """(path, session) of the fixed-KV entry's small-batch twin, or (None, None) when it has none or `wanted` is
        False; FileNotFoundError when `wanted` is True and there is none."""
        entry = (fixed_entry or {}).get("small_batch")
        if wanted and entry is None:
            raise FileNotFoundError(
                f"no small-batch fixed-KV graph for variant {variant!r} in {artifact_dir / ONNX_DIR} (meta.json has "
                f"none; the exporter writes one for int8); re-export it: ./tinylm export --model {artifact_dir.name}"
            )
        if entry is None or wanted is False:
            return None, None
        path = artifact_dir / ONNX_DIR / entry["file"]
        if entry.get("gate") == "failed":
            log.warning("%s failed its parity gate at export time; serving it anyway, as asked", path)
        session = _open_session(path, options)
        self._check_io(session, path)
        return path, session

    def _resize_pool(self, capacity: int) -> None:
        """View the flat buffers at `capacity` positions, moving the live slots' K/V to their new place (no allocation;
        nothing moves when no sequence is live). Positions past a row's length may hold stale finite values: the
        graph's mask gives them probability 0."""
        shape = (self.n_slots, self.n_kv_head, capacity, self.head_dim)
        pool = [flat[: int(np.prod(shape))].reshape(shape) for flat in self._flat]
        for new, old in zip(pool, self._pool):
            live = {slot: old[slot, :, :length].copy() for slot, length in self._past.items()}
            for slot, rows in live.items():
                new[slot, :, : rows.shape[1]] = rows
        self._pool = pool

    def _io_names(self, meta: dict[str, Any]) -> tuple[list[str], list[str]]:
        """[input_ids, past_key_0, past_value_0, ...] and [logits, present_key_0, present_value_0, ...] (the fixed-KV
        graph: [input_ids, past_lengths, cache_key_0, ...] and [logits, new_key_0, ...]): meta.json's lists when it
        has them, else the contract's names (`_check_io` holds them against each graph)."""
        layers = range(self.n_layer)
        cache_in, new_out, first = ("cache", "new", ["past_lengths"]) if self.fixed_kv else ("past", "present", [])
        inputs = meta.get("inputs") or ["input_ids", *first] + [
            f"{cache_in}_{kv}_{i}" for i in layers for kv in ("key", "value")
        ]
        outputs = meta.get("outputs") or ["logits"] + [f"{new_out}_{kv}_{i}" for i in layers for kv in ("key", "value")]
        inputs = [i["name"] if isinstance(i, dict) else i for i in inputs]
        outputs = [o["name"] if isinstance(o, dict) else o for o in outputs]
        return inputs, outputs

    def _check_io(self, session: Any, path: Path) -> None:
        """ValueError unless `session`'s graph has exactly this runner's input and output names."""
        graph_in = {i.name for i in session.get_inputs()}
        graph_out = {o.name for o in session.get_outputs()}
        n_inputs = (2 if self.fixed_kv else 1) + 2 * self.n_layer
        if set(self._inputs) != graph_in or set(self._outputs) != graph_out or len(self._inputs) != n_inputs:
            raise ValueError(
                f"{path} does not follow the KV-cache contract for {self.n_layer} layers: "
                f"graph inputs {sorted(graph_in)}, outputs {sorted(graph_out)}"
            )

    @property
    def n_live(self) -> int:
        """Sequences whose KV arrays this runner holds (0 when idle: the leak check)."""
        return len(self._past)

    def _check_fits(self, slot: int, end: int) -> None:
        if end > self.max_len:
            raise ValueError(
                f"slot {slot}: {end} tokens exceed max_len {self.max_len} (the model's block_size): "
                f"prompt + generated tokens must stay <= {self.max_len}"
            )

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prompts of equal length run together from an empty past (fixed-KV graph: all in one right-padded call);
        returns logits (B, V)."""
        for slot, prompt in zip(slots, prompts):
            self._check_fits(slot, len(prompt))
        if self.fixed_kv:
            return self._run_fixed(slots, prompts, [0] * len(slots))
        groups: dict[int, list[int]] = defaultdict(list)
        for row, prompt in enumerate(prompts):
            groups[len(prompt)].append(row)
        out = np.empty((len(slots), self.vocab_size), dtype=np.float32)
        for rows in groups.values():
            ids = np.array([prompts[r] for r in rows], dtype=np.int64)  # (g, T)
            empty = np.zeros((len(rows), self.n_kv_head, 0, self.head_dim), dtype=np.float32)
            out[rows] = self._run([slots[r] for r in rows], ids, [empty] * (2 * self.n_layer))
        return torch.from_numpy(out)

    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Sequences at the same position run together (fixed-KV graph: all in one call); returns logits (B, V)."""
        for slot, pos in zip(slots, positions):
            assert self._past.get(slot) == pos, (
                f"slot {slot} holds {self._past.get(slot)} tokens, asked to decode at {pos}"
            )
            self._check_fits(slot, pos + 1)
        if self.fixed_kv:
            return self._run_fixed(slots, [[t] for t in tokens], positions)
        groups: dict[int, list[int]] = defaultdict(list)
        for row, pos in enumerate(positions):
            groups[pos].append(row)
        out = np.empty((len(slots), self.vocab_size), dtype=np.float32)
        for rows in groups.values():
            group_slots = [slots[r] for r in rows]
            ids = np.array([[tokens[r]] for r in rows], dtype=np.int64)  # (g, 1)
            if len(rows) == 1:
                past = self._kv[group_slots[0]]
            else:
                past = [np.concatenate([self._kv[s][j] for s in group_slots]) for j in range(2 * self.n_layer)]
            out[rows] = self._run(group_slots, ids, past)
        return torch.from_numpy(out)

    def _run(self, slots: list[int], ids: np.ndarray, past: list[np.ndarray]) -> np.ndarray:
        """One ORT call; stores each row's present arrays under its slot; returns last-token logits (g, V)."""
        feed = {self._inputs[0]: ids, **dict(zip(self._inputs[1:], past))}
        logits, *present = self.session.run(self._outputs, feed)  # (g, T, V), 2 * n_layer x (g, Hkv, P+T, D)
        for row, slot in enumerate(slots):
            self._kv[slot] = [p[row : row + 1] for p in present]
            self._past[slot] = present[0].shape[2]
        return logits[:, -1]

    def _run_fixed(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """One call of the fixed-KV graph over the pool rows min(slots)..max(slots), each row's chunk right-padded
        to the longest, at positions starts[b]..; writes the chunks' K/V into the pool; returns logits (B, V) at each
        row's last token."""
        lo, hi = min(slots), max(slots) + 1
        T = max(len(c) for c in chunks)
        needed = max(start + len(c) for c, start in zip(chunks, starts))
        if needed > self._pool[0].shape[2]:
            self._resize_pool(cache_capacity(needed, self.max_len))
        ids = np.zeros((hi - lo, T), dtype=np.int64)  # span rows not in the call: token 0 from an empty past
        past_lengths = np.zeros(hi - lo, dtype=np.int64)
        for slot, chunk, start in zip(slots, chunks, starts):
            ids[slot - lo, : len(chunk)] = chunk
            past_lengths[slot - lo] = start
        span = [buffer[lo:hi] for buffer in self._pool]  # views: ORT reads the pool in place
        feed = dict(zip(self._inputs, [ids, past_lengths, *span]))
        small = self.small_batch_session is not None and (hi - lo) * T <= SMALL_BATCH_MAX_TOKENS
        session = self.small_batch_session if small else self.session
        logits, *new = session.run(self._outputs, feed)  # (span, T, V), 2 * n_layer x (span, Hkv, T, D)
        for slot, chunk, start in zip(slots, chunks, starts):
            n, row = len(chunk), slot - lo
            for buffer, rows in zip(span, new):
                buffer[row, :, start : start + n] = rows[row, :, :n]
            self._past[slot] = start + n
        rows = [slot - lo for slot in slots]
        last = [len(c) - 1 for c in chunks]
        return torch.from_numpy(np.ascontiguousarray(logits[rows, last]))

    def release(self, slot: int) -> None:
        """Drop the slot's arrays (fixed-KV graph: its length; the next sequence overwrites its pool row, and the pool
        shrinks when the longest live sequence fits a smaller capacity)."""
        self._kv.pop(slot, None)
        self._past.pop(slot, None)
        if self.fixed_kv:
            capacity = cache_capacity(max(self._past.values(), default=0), self.max_len)
            if capacity < self._pool[0].shape[2]:
                self._resize_pool(capacity)
