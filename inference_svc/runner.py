"""Model runners: execute one batched prefill or decode step and hand back next-token logits.

The engine talks to every backend through the same three calls (`ModelRunner`):
- `prefill(slots, prompts)`: run whole prompts (past length 0) into their slots -> (B, V) logits at each
  prompt's last token;
- `decode(slots, tokens, positions)`: one new token per row, row b at position positions[b] -> (B, V);
- `release(slot)`: the slot's sequence is gone (the ORT runner drops its arrays; the torch cache is reused).

`TorchRunner` runs `GPT.forward_cached` over a preallocated `KVCache`: eager on CPU; on CUDA in bf16, with
the decode step captured as CUDA graphs at batch buckets 1, 2, 4, ..., max (static input buffers; padded
rows write into a scratch slot), as gpt-fast and vLLM do, so a decode step costs one graph launch.
It also keeps the decode loop on the device (`prefill_sample` / `decode_sample`, which the engine prefers):
every slot's next input token, position and sampling settings live in device tensors (`SlotState`), and the
captured step runs the model, samples (greedy and sampled rows together, per-row counter-based draws; on CUDA one
Triton launch, `kernels.sampling`, whose reference is `model.sampling.sample_rows`) and writes each new token back
as the next step's input, so the host only launches the graph and reads the new ids, one step behind. Decode attention reads each row's slot in place
(`kernels.decode_attention`), with no gather of the cache.
`OrtRunner` (in `ort_runner.py`) runs an exported ONNX model on ONNX Runtime.
"""

from __future__ import annotations

import contextlib

import logging
from typing import Callable, Protocol, Sequence

import torch

from inference_svc.cpu_weights import CPU_WEIGHTS, CompiledDecodeStep, cpu_int8_model
from model.field_checks import check_choice, check_int
from model.kv_cache import KVCache
from kernels.dispatch import Impl
from kernels.sampling import SlotSettings, advance_slots
from model.sampling import SamplingParams, sample_slots
from model.transformer import GPT

__all__ = ["ModelRunner", "SlotState", "Staging", "TorchRunner", "batch_buckets", "multi_step_counts"]

log = logging.getLogger(__name__)

# Attention spans the decode graphs are captured at (each graph attends over a fixed number of cache
# positions; a shorter span is cheaper, so long contexts get a few graphs, not one at max_len).
_KV_BUCKET = 256
SAMPLER_KERNEL_MAX_VOCAB = 4096  # SlotState's default sampler: the Triton kernel up to this vocabulary, else torch
# Prompt-length buckets of the captured prefill (padded up to the next); a longer prompt, or a chunk that continues
# one, is prefilled eagerly. An eager prefill launches ~220 kernels from Python: 11-15 ms of the engine thread on
# the H200's host (tools.serve_probe), a stall of every running stream; replayed, it costs one graph launch.
_PREFILL_BUCKETS = (16, 32, 64, 128, 256)
# Several decode steps captured in one graph (`decode_sample(steps=k)`, the engine's multi-step decode) for batch
# buckets up to this: there one graph launch (~40 us of host time on the H200, cudaGraphLaunch under the profiler)
# is half of a step's 0.1 ms on the GPU; above it a step is long enough to hide the launches of single-step graphs.
MULTI_STEP_GRAPH_MAX_BATCH = 16
MAX_DECODE_STEPS = 64


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


def multi_step_counts(n_slots: int, steps: int | Callable[[int], int]) -> dict[int, list[int]]:
    """For each batch bucket of `n_slots`, the step counts above 1 that a decode launch of its batches uses: `steps`,
    or `steps(B)` for each batch B the bucket serves (those above its previous bucket, up to it)."""
    counts, lo = {}, 1
    for b in batch_buckets(n_slots):
        ks = {steps} if isinstance(steps, int) else {steps(B) for B in range(lo, b + 1)}
        for k in ks:
            if not 1 <= k <= MAX_DECODE_STEPS:
                raise ValueError(f"steps must be 1..{MAX_DECODE_STEPS}, got {k}")
        counts[b], lo = sorted(k for k in ks if k > 1), b + 1
    return counts


class Staging:
    """Host-to-device copies that never make the host wait for the GPU: each goes through a pinned buffer (a
    ring of them), reused only once the copy that last read it has run. A pageable copy may block until the
    stream drains, which would undo the one-step-ahead loop. On CPU devices: a plain copy."""

    def __init__(self, device: torch.device, n: int = 8) -> None:
        self.device = device
        self._bufs: list[torch.Tensor | None] = [None] * n
        self._events: list[torch.cuda.Event | None] = [None] * n
        self._i = 0

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return host.to(self.device)
        out = self._pinned(host).to(self.device, non_blocking=True)
        self._recorded()
        return out

    def copy_into(self, dst: torch.Tensor, host: torch.Tensor) -> None:
        """dst (a device tensor of host's shape, e.g. a CUDA graph's static input) <- host, the same way."""
        if self.device.type != "cuda":
            dst.copy_(host)
            return
        dst.copy_(self._pinned(host), non_blocking=True)
        self._recorded()

    def _pinned(self, host: torch.Tensor) -> torch.Tensor:
        """host copied into the next pinned buffer of the ring (once the copy that last read it has run)."""
        i = self._i
        if self._events[i] is not None:
            self._events[i].synchronize()  # the copy from this buffer, n copies ago: long done
        nbytes = host.numel() * host.element_size()
        buf = self._bufs[i]
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[i] = torch.empty(max(nbytes, 1 << 12), dtype=torch.uint8).pin_memory()
        pinned = buf[:nbytes].view(host.dtype).view(host.shape)
        pinned.copy_(host)
        return pinned

    def _recorded(self) -> None:
        """Mark the buffer just read by an enqueued copy; the ring moves on."""
        i = self._i
        self._events[i] = torch.cuda.Event()
        self._events[i].record()
        self._i = (i + 1) % len(self._bufs)


class SlotState:
    """The decode loop's state on the device, indexed by KV-cache slot (the runner's scratch slot included):
    each slot's next input token and its position, and its request's sampling settings. Written when a request
    is prefilled (`admit`), then only by the captured decode step itself."""

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size  # the model's (the logits' width)
        # The full sampler and the state update: "auto" (the Triton kernels on CUDA), "triton" or "reference". Auto up
        # to SAMPLER_KERNEL_MAX_VOCAB ids only: on the H200 the one-launch sampler took 0.022 ms against torch's 0.118
        # at V=65, B=1 (5-8x at B 1-256), but lost at V=50304 below 256 rows (0.65 vs 0.21 ms at B=1; top-p only
        # 0.12-0.6x) (python -m kernels.sampling_bench, commit 25acd5e).
        self.impl: Impl = "auto" if vocab_size <= SAMPLER_KERNEL_MAX_VOCAB else "reference"
        self.blocked = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # ids never drawn (`allow`)
        self.token = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.pos = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.seed = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.greedy = torch.ones(n_slots, dtype=torch.bool, device=device)
        self.temperature = torch.ones(n_slots, 1, device=device)
        self.top_k = torch.full((n_slots, 1), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(n_slots, 1, device=device)
        self.penalty = torch.ones(n_slots, 1, device=device)
        self.seen = torch.zeros(n_slots, vocab_size, dtype=torch.bool, device=device)  # context tokens per slot

    def allow(self, n: int) -> None:
        """Only ids below n (the tokenizer's vocabulary; the model's may be padded beyond it) are drawn."""
        self.blocked.copy_(torch.arange(self.vocab_size, device=self.blocked.device) >= n)

    def admit(
        self,
        staging: Staging,
        slots: torch.Tensor,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        prompts: Sequence[Sequence[int]],
    ) -> None:
        """Set the sampling settings and the context of newly prefilled slots (slots (B,) long on the device)."""
        V = self.vocab_size
        ints = torch.tensor([[seed, p.top_k or V, p.temperature == 0.0] for p, seed in zip(params, seeds)])
        floats = torch.tensor([[p.temperature or 1.0, p.top_p, p.repetition_penalty] for p in params])
        ints, floats = staging.to_device(ints), staging.to_device(floats)
        self.set_rows(slots, *ints.T, *floats.T)
        self.seen[slots] = False
        if any(p.repetition_penalty != 1.0 for p in params):
            rows = [b for b, ids in enumerate(prompts) for _ in ids]
            cols = [t for ids in prompts for t in ids]
            at = staging.to_device(torch.tensor([rows, cols], dtype=torch.long))
            self.seen[slots[at[0]], at[1]] = True

    def set_rows(
        self,
        slots: torch.Tensor,
        seed: torch.Tensor,
        top_k: torch.Tensor,
        greedy: torch.Tensor,
        temperature: torch.Tensor,
        top_p: torch.Tensor,
        penalty: torch.Tensor,
    ) -> None:
        """Store the sampling settings of the rows in `slots`, each (B,) on the device (no host value: capturable)."""
        self.seed[slots], self.top_k[slots], self.greedy[slots] = seed, top_k[:, None], greedy.bool()
        self.temperature[slots], self.top_p[slots], self.penalty[slots] = (
            temperature[:, None],
            top_p[:, None],
            penalty[:, None],
        )

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, counters: torch.Tensor, full: bool) -> torch.Tensor:
        """Next tokens of the rows in `slots` from their logits (B, V) float32; greedy only unless `full` (a row
        with temperature > 0 or a repetition penalty). No host sync: captured inside the decode graph. The full
        sampler is `kernels.sampling.sample_slots`: one Triton launch on CUDA, the PyTorch path elsewhere."""
        if not full:
            return logits.masked_fill(self.blocked, float("-inf")).argmax(dim=-1)  # ids the tokenizer cannot decode
        settings = SlotSettings(
            self.blocked, self.seen, self.penalty, self.greedy, self.temperature, self.top_k, self.top_p, self.seed
        )
        return sample_slots(logits, slots, counters, settings, self.impl)

    def advance(self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, full: bool) -> None:
        """The new tokens become the rows' next inputs, at `positions` (already advanced); with `full`, they join
        the slots' seen masks. One launch on CUDA (`kernels.sampling.advance_slots`)."""
        advance_slots(self.token, self.pos, self.seen, slots, tokens, positions, full, self.impl)


class TorchRunner:
    """`GPT.forward_cached` over a slot-addressed `KVCache` of n_slots sequences (plus one scratch slot).

    device/dtype default to the model's device and to bf16 on CUDA, the model's dtype elsewhere.
    `cuda_graphs` (default: on when the device is CUDA) runs decode steps as CUDA graphs at batch buckets up to
    `n_slots` and attention spans of 256, 512, ... up to max_len: the device-resident step (greedy-only and full
    sampling; `capture_graphs` captures them all) and the logits-returning `decode`, each captured on first use. `attention_in_place` (default: on CUDA) decodes with
    `kernels.decode_attention` over the cache in place instead of gathering each row's slot for SDPA.
    `small_batch_kernels` (default: on CUDA; with attention in place): the device-resident steps of batch buckets up to
    `kernels.decode_gemv.MAX_ROWS` run `GPT.forward_cached`'s fused small-batch kernels (about 5 launches per layer;
    True takes them on CUDA, "reference" runs their PyTorch references: see forward_cached).
    `multi_step_max_batch`: the largest batch bucket whose several decode steps (`decode_sample(steps=)`) replay as
    one captured graph (default MULTI_STEP_GRAPH_MAX_BATCH; larger buckets replay the single-step graph per step).
    `cpu_weights` (CPU devices only; `inference_svc.cpu_weights`): "fp32" (default: the model in `dtype`, as given),
    "bf16" (model, activations and cache in bf16; `dtype` must be left None or be bf16) or "int8" (a copy of the model
    with weight-only INT8 Linears; the rest in `dtype`). A CPU decode step at batch 1 is bound by the weights' bytes.
    `cpu_compile` (CPU only; default: on with cpu_weights="int8"): the device-resident decode steps of one row run as
    `inference_svc.cpu_weights.CompiledDecodeStep` (torch.compile of the whole step, the cache only read inside it;
    every layer's new K/V written after it), compiled when the runner is built (on this repo's 2-core VM 64 s with an
    empty Inductor cache, 24 s with its on-disk cache warm, 1.7 s for a later runner in the same process); other row
    counts take the eager path.
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
        attention_in_place: bool | None = None,
        small_batch_kernels: bool | str | None = None,
        multi_step_max_batch: int = MULTI_STEP_GRAPH_MAX_BATCH,
        cpu_weights: str = "fp32",
        cpu_compile: bool | None = None,
    ) -> None:
        check_int("multi_step_max_batch", multi_step_max_batch, 0)
        check_choice("cpu_weights", cpu_weights, CPU_WEIGHTS)
        self.multi_step_max_batch = multi_step_max_batch
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if cpu_weights != "fp32" and device.type != "cpu":
            raise ValueError(f"cpu_weights={cpu_weights!r} needs a CPU device, got {device} (use 'fp32' there)")
        if cpu_compile not in (None, True, False):
            raise ValueError(f"cpu_compile must be None, True or False, got {cpu_compile!r}")
        if cpu_compile and device.type != "cpu":
            raise ValueError(f"cpu_compile needs a CPU device, got {device} (leave it None there)")
        if cpu_weights == "bf16":
            if dtype not in (None, torch.bfloat16):
                raise ValueError(f"cpu_weights='bf16' runs the model in bf16; dtype must be None or bf16, got {dtype}")
            dtype = torch.bfloat16
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
        self.cpu_weights = cpu_weights
        model = model.to(device=device, dtype=dtype)
        if cpu_weights == "int8":  # a copy: the caller's model keeps its float Linears
            model = cpu_int8_model(model)
        self.model = model.eval()
        self.model.fuse_qkv()  # one q/k/v matmul per layer in the cached steps
        compile_step = cpu_weights == "int8" if cpu_compile is None else cpu_compile
        self._compiled_step = CompiledDecodeStep(self.model, rows=1) if compile_step else None
        # The fused copies this runner's CUDA graphs will read by address: held here, so that a later fuse_qkv (the
        # weights changed in place, another runner over the same model) cannot free them under the graphs.
        self._fused = [getattr(block.attn, "qkv", None) for block in self.model.blocks]
        self.config = model.config
        self.device, self.dtype = device, dtype
        self.n_slots = n_slots
        self.vocab_size = self.config.vocab_size
        self.cache = KVCache(n_slots + 1, self.config, max_len, dtype=dtype, device=device)
        self.max_len = self.cache.max_len
        self._scratch = n_slots  # padded rows of a graph bucket write here, never read by a real row
        if self._compiled_step is not None:
            try:
                self._compiled_step.warm(self.cache, self._scratch)
            except Exception as e:  # e.g. no C++ compiler for Inductor here: the eager step, as cpu_compile=False
                log.warning("cpu_compile: the compiled decode step failed to build (%s); decoding eagerly", e)
                self._compiled_step = None
        self.attention_in_place = device.type == "cuda" if attention_in_place is None else attention_in_place
        # Default: on with CUDA graphs. The captured step at B=1 went 0.195 -> 0.113 ms (58 -> 34 kernels), at B=8
        # 0.223 -> 0.197 ms (H200, python -m kernels.decode_step_bench, commit f194b53).
        self.small_batch_kernels = (device.type == "cuda") if small_batch_kernels is None else small_batch_kernels
        self.staging = Staging(device)
        self.state = SlotState(n_slots + 1, self.vocab_size, device)
        self._graphs: dict[tuple, _Graph] = {}
        # The captured prefill's static inputs (`_prefill_inputs` lays them out), positions (all 0) and new ids.
        self._pf_long = torch.zeros(n_slots * (_PREFILL_BUCKETS[-1] + 5), dtype=torch.long, device=device)
        self._pf_float = torch.ones(3 * n_slots, device=device)
        self._pf_zero = torch.zeros(n_slots, dtype=torch.long, device=device)
        self._pf_out = torch.zeros(n_slots, dtype=torch.long, device=device)
        self._prefill_graphs = True  # False once a prefill failed to capture: eager from then on
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
        self.cuda_graphs = cuda_graphs
        if cuda_graphs:
            max_b = self.n_slots
            self._static = torch.zeros(3, max_b, dtype=torch.long, device=device)  # slots, tokens, positions
            self._pinned = torch.zeros(3, max_b, dtype=torch.long).pin_memory()
            self._rows = torch.full((max_b,), self._scratch, dtype=torch.long, device=device)  # slot of each row
            self._rows_now: list[int] = []  # what _rows holds (real rows; the rest is the scratch slot)
            # new ids of a captured decode: step j of a k-step graph at bucket b writes [j * b, (j + 1) * b)
            self._out = torch.zeros(MAX_DECODE_STEPS * max_b, dtype=torch.long, device=device)
            self._steps_out = torch.zeros_like(self._out)  # several single-step graphs' ids, step-major (decode_sample)
            self._pool = torch.cuda.graph_pool_handle()
            self._warm_prefill()

    @property
    def cpu_compile(self) -> bool:
        """Whether batch-1 decode steps run the compiled step (False too when it failed to build)."""
        return self._compiled_step is not None

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
        idx = self.staging.to_device(torch.tensor(rows, dtype=torch.long))  # (B, T)
        meta = self.staging.to_device(torch.tensor([list(slots), list(starts), lengths], dtype=torch.long))
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
        if self.cuda_graphs:
            return self._replay(host, kv_len)
        meta = host.to(self.device, non_blocking=True)
        logits = self.model.forward_cached(meta[1].view(B, 1), self.cache, meta[0], meta[2], kv_len=kv_len)
        return logits[:, 0].float()  # (B, V)

    def release(self, slot: int) -> None:
        """Nothing to free: the slot's cache rows are overwritten by its next sequence (attention never
        reads past a row's own position)."""

    # The device-resident loop ----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill_sample(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        starts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Prefill the prompts into their slots, set the slots' sampling settings, and sample each row's first new
        token, which becomes the slot's next decode input. Returns the new ids (B,) long, on the device.
        `starts[b]`: prompt b's first `starts[b]` tokens are in its slot already (chunked prefill, `extend`)."""
        starts = [0] * len(slots) if starts is None else starts
        if self.cuda_graphs and self._prefill_graphs and not any(starts):
            longest = max(len(p) for p in prompts)
            T = next((t for t in _PREFILL_BUCKETS if longest <= t <= self.max_len), None)
            if T is not None:
                return self._prefill_graphed(slots, prompts, params, seeds, T)
        slot_t = self.staging.to_device(torch.tensor(list(slots), dtype=torch.long))
        self.state.admit(self.staging, slot_t, params, seeds, prompts)
        logits = self.extend(slots, [p[a:] for p, a in zip(prompts, starts)], starts)  # (B, V) float32
        lengths = self.staging.to_device(torch.tensor([len(p) for p in prompts], dtype=torch.long))
        full = any(p.temperature != 0.0 or p.repetition_penalty != 1.0 for p in params)
        tokens = self.state.sample(logits, slot_t, lengths, full)  # counters: the new token's position
        self.state.advance(slot_t, tokens, lengths, full)
        return tokens

    @torch.inference_mode()
    def decode_sample(self, slots: Sequence[int], kv_len: int, full: bool, steps: int = 1) -> torch.Tensor:
        """`steps` decode steps for the slots (each fed its own next token, at its own position; every position
        < kv_len + steps - 1), sampling on the device; `full` when some row samples or penalises (else greedy
        only). Returns the new ids on the device, (B,) long for one step, (steps, B) for several: a view of a
        buffer that the next call rewrites, so copy it before then (stream order: a copy enqueued now is safe).
        Several steps replay one graph of them where `capture_graphs(steps=)` captured one for the batch bucket,
        else a single-step graph per step."""
        if not 1 <= steps <= MAX_DECODE_STEPS:
            raise ValueError(f"steps must be 1..{MAX_DECODE_STEPS}, got {steps}")
        B = len(slots)
        if not self.cuda_graphs:
            rows = self.staging.to_device(torch.tensor(list(slots), dtype=torch.long))
            new = [self._resident_step(rows, kv_len + j, full).clone() for j in range(steps)]
            return new[0] if steps == 1 else torch.stack(new)
        b = next(x for x in batch_buckets(self.n_slots) if x >= B)
        slots = list(slots)
        if slots != self._rows_now:  # the batch changed: a new row -> slot map (rows past B: the scratch slot)
            padded = slots + [self._scratch] * max(0, len(self._rows_now) - B)
            self._rows[: len(padded)].copy_(self.staging.to_device(torch.tensor(padded, dtype=torch.long)))
            self._rows_now = slots
        if steps == 1:
            self._resident_graph(b, self._span(kv_len), full).graph.replay()
            return self._out[:B]
        multi = self._graphs.get(_resident_key(b, self._span(kv_len + steps - 1), full, steps))
        if multi is not None:  # captured by capture_graphs(steps=) for this bucket
            multi.graph.replay()
            return self._out[: steps * b].view(steps, b)[:, :B]
        out = self._steps_out[: steps * B].view(steps, B)
        for j in range(steps):
            self._resident_graph(b, self._span(kv_len + j), full).graph.replay()
            out[j].copy_(self._out[:B])
        return out

    def _span(self, kv_len: int) -> int:
        return next(s for s in self._kv_buckets() if s >= kv_len)

    def _resident_step(self, rows: torch.Tensor, kv_len: int, full: bool) -> torch.Tensor:
        """The captured step over rows (b,) of slots: model, sampler, state update. Returns the new ids (b,)."""
        state = self.state
        tokens, positions = state.token[rows], state.pos[rows]
        if self._compiled_step is not None and rows.shape[0] == self._compiled_step.rows:
            logits = self._compiled_step(tokens.view(-1, 1), self.cache, rows, positions, kv_len).float()  # (b, V)
        else:
            logits = self.model.forward_cached(
                tokens.view(-1, 1),
                self.cache,
                rows,
                positions,
                kv_len=kv_len,
                attention_in_place=self.attention_in_place,
                small_batch_kernels=self.small_batch_kernels,
            )[:, 0].float()  # (b, V)
        after = positions + 1  # the new token's position: its draw's counter, then the slot's next position
        new = state.sample(logits, rows, after, full)
        # The scratch slot (padded rows) stays at position 0, so it never runs past the cache.
        state.advance(rows, new, torch.where(rows == self._scratch, 0, after), full)
        return new

    # CUDA graphs -----------------------------------------------------------------------------------

    def _prefill_graphed(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        T: int,
    ) -> torch.Tensor:
        """`prefill_sample` from position 0 as a CUDA graph over (batch bucket, T, greedy-only / full), captured on
        first use: the prompts right-padded to T, the padded rows on the scratch slot."""
        B = len(slots)
        b = next(x for x in batch_buckets(self.n_slots) if x >= B)
        full = any(p.temperature != 0.0 or p.repetition_penalty != 1.0 for p in params)
        try:
            graph = self._prefill_graph(b, T, full)
        except RuntimeError:
            return self.prefill_sample(slots, prompts, params, seeds)  # eager from now on
        self._prefill_inputs(b, T, slots, prompts, params, seeds)
        graph.graph.replay()
        return self._pf_out[:B]

    def _prefill_graph(self, b: int, T: int, full: bool) -> "_Graph":
        key = ("prefill", b, T, full)
        if key not in self._graphs:
            self._prefill_inputs(b, T, [], [], [], [])  # the capture's warm-up runs for real: every row on scratch
        try:
            return self._graph(key, lambda: self._prefill_step(b, T, full))
        except RuntimeError:  # a model whose prefill cannot be captured still serves, eagerly (and says so once)
            log.exception("prefill %s could not be captured as a CUDA graph; prefill runs eagerly from now on", key)
            self._prefill_graphs = False
            raise

    def _prefill_inputs(
        self,
        b: int,
        T: int,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
    ) -> None:
        """Lay a prefill's inputs into the static buffers: ids (b, T), then slots, lengths, seeds, top-k, greedy (b
        each); temperature, top-p, penalty (b each). Rows past the prompts: the scratch slot, one token, greedy."""
        V, pad = self.vocab_size, b - len(slots)
        ids = [[*p, *[0] * (T - len(p))] for p in prompts] + [[0] * T] * pad
        ints = [
            [*slots, *[self._scratch] * pad],
            [*(len(p) for p in prompts), *[1] * pad],
            [*seeds, *[0] * pad],
            [*(p.top_k or V for p in params), *[V] * pad],
            [*(int(p.temperature == 0.0) for p in params), *[1] * pad],
        ]
        floats = [
            [*(p.temperature or 1.0 for p in params), *[1.0] * pad],
            [*(p.top_p for p in params), *[1.0] * pad],
            [*(p.repetition_penalty for p in params), *[1.0] * pad],
        ]
        host = torch.cat([torch.tensor(ids, dtype=torch.long).view(-1), torch.tensor(ints, dtype=torch.long).view(-1)])
        self.staging.copy_into(self._pf_long[: host.numel()], host)
        self.staging.copy_into(self._pf_float[: 3 * b], torch.tensor(floats, dtype=torch.float32).view(-1))

    def _prefill_step(self, b: int, T: int, full: bool) -> None:
        """What a prefill graph records: admit the rows' settings, run the padded prompts into their slots (padded
        tokens into the scratch slot), sample each row's first new token and leave it as the slot's next input."""
        n = b * T
        idx = self._pf_long[:n].view(b, T)
        slots, lengths, seeds, top_k, greedy = self._pf_long[n : n + 5 * b].view(5, b)
        state = self.state
        state.set_rows(slots, seeds, top_k, greedy, *self._pf_float[: 3 * b].view(3, b))
        if full:  # the prompts' tokens, for the repetition penalty (it looks at rows with a penalty only)
            valid = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]
            counts = torch.zeros(b, self.vocab_size, dtype=torch.int32, device=idx.device)
            state.seen[slots] = counts.scatter_add_(1, idx, valid.int()) > 0
        else:  # index_fill_: a scalar store (an index_put of False would copy a CPU value: refused in a capture)
            state.seen.index_fill_(0, slots, False)
        logits = self.model.forward_cached(
            idx, self.cache, slots, self._pf_zero[:b], lengths, kv_len=T, last_only=True, pad_slot=self._scratch
        ).float()  # (b, V)
        tokens = state.sample(logits, slots, lengths, full)  # counters: the new token's position
        state.advance(slots, tokens, lengths, full)
        self._pf_out[:b].copy_(tokens)

    def _kv_buckets(self) -> list[int]:
        spans, s = [], _KV_BUCKET
        while s < self.max_len:
            spans.append(s)
            s *= 2
        return spans + [self.max_len]

    def capture_graphs(self, steps: int | Callable[[int], int] = 1) -> None:
        """Capture every device-resident decode graph now (batch bucket x attention span x greedy-only / full, largest
        first, all in one memory pool: their outputs live outside it, so any replay order is safe), so that no
        request pays for a capture; with `steps` > 1 also graphs of that many steps for the batch buckets up to
        `multi_step_max_batch` (`decode_sample(steps=)`). `steps` may be a function of the batch size (the engine's
        decode steps by batch): each bucket gets a graph for every step count of the batches it serves. The resident
        engine calls it at start; without it each graph is captured on first use. Nothing to do without CUDA graphs."""
        if not self.cuda_graphs:
            return
        counts = multi_step_counts(self.n_slots, steps)
        for b in reversed(batch_buckets(self.n_slots)):
            for span in reversed(self._kv_buckets()):
                for full in (True, False):
                    self._resident_graph(b, span, full)
                    for k in counts[b] if b <= self.multi_step_max_batch else ():
                        self._resident_graph(b, span, full, k)
        # The prefills of requests arriving a few per step with short prompts (the rest are captured on first use).
        for b in (x for x in batch_buckets(self.n_slots) if x <= 8):
            for T in (t for t in _PREFILL_BUCKETS[:3] if t <= self.max_len):
                for full in (True, False):
                    if self._prefill_graphs:
                        with contextlib.suppress(RuntimeError):  # logged; prefill stays eager
                            self._prefill_graph(b, T, full)
        torch.cuda.synchronize(self.device)
        log.info("captured %d decode CUDA graphs (batch buckets %s)", len(self._graphs), batch_buckets(self.n_slots))

    def _resident_graph(self, b: int, span: int, full: bool, steps: int = 1) -> "_Graph":
        def step() -> None:
            for j in range(steps):  # each step feeds the next through the slots' state, on the device
                self._out[j * b : (j + 1) * b].copy_(self._resident_step(self._rows[:b], span, full))

        return self._graph(_resident_key(b, span, full, steps), step)

    def _graph(self, key: tuple, step: Callable[[], None]) -> "_Graph":
        """The graph captured for `key`, capturing `step` on first use."""
        graph = self._graphs.get(key)
        if graph is None:
            with torch.inference_mode():
                graph = self._graphs[key] = self._capture(step)
        return graph

    def _capture(self, step: Callable[[], None]) -> "_Graph":
        """Warm `step` up on a side stream, then capture it. Every row points at the scratch slot meanwhile (the
        warm-up runs for real), and the rows in use are put back after."""
        rows_saved = self._rows.clone()
        self._rows.fill_(self._scratch)
        self._static[0].fill_(self._scratch)
        self._static[1:].zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture (allocator, cuBLAS handles, Triton autotuning)
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        self._rows.copy_(rows_saved)
        return _Graph(graph)

    def _warm_prefill(self) -> None:
        """Prefill a few shapes into the scratch slot, so the first requests do not pay the one-time costs (Triton
        compiles a kernel per specialisation of its row count: 1, a multiple of 16, any other; cuBLAS picks its
        algorithms) inside their time to first token."""
        for lengths in ([16], [17], [7, 5, 3]):
            n = min(max(lengths), self.max_len)
            self.extend([self._scratch] * len(lengths), [[0] * min(t, n) for t in lengths], [0] * len(lengths))
        torch.cuda.synchronize(self.device)

    def _eager_decode_into_static(self, b: int, kv_len: int) -> torch.Tensor:
        """The logits decode step over the first b rows of the static buffers (what a graph records)."""
        slots, tokens, positions = self._static[0, :b], self._static[1, :b], self._static[2, :b]
        logits = self.model.forward_cached(tokens.view(b, 1), self.cache, slots, positions, kv_len=kv_len)
        return logits[:, 0].float()  # (b, V)

    def _replay(self, host: torch.Tensor, kv_len: int) -> torch.Tensor:
        B = host.shape[1]
        b = next(x for x in batch_buckets(self.n_slots) if x >= B)
        span = self._span(kv_len)
        outputs: list[torch.Tensor] = []  # what the capture records (speculative decoding and the runner's callers)
        graph = self._graph(("logits", b, span), lambda: outputs.append(self._eager_decode_into_static(b, span)))
        if graph.logits is None:
            graph.logits = outputs[-1]
        # Real rows first; padded rows decode token 0 at position 0 of the scratch slot.
        self._pinned[0, :b] = self._scratch
        self._pinned[1:, :b] = 0
        self._pinned[:, :B] = host
        self._static[:, :b].copy_(self._pinned[:, :b], non_blocking=True)
        graph.graph.replay()
        # Copy out: the next replay overwrites the graph's output buffer.
        return graph.logits[:B].clone()


def _resident_key(b: int, span: int, full: bool, steps: int) -> tuple:
    """The graphs dict's key of a device-resident decode graph (several steps: one more field)."""
    return ("resident", b, span, full) + ((steps,) if steps > 1 else ())


class _Graph:
    """One captured step (and, for a logits graph, its static output buffer, rewritten by each replay)."""

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.graph = graph
        self.logits: torch.Tensor | None = None
