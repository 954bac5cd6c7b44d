"""Benchmark cases of the inference kernels, run by `python -m bench_svc.benches.kernels` (`BENCH_MODULES` there).

Every case here is timed the way decoding calls it: many calls captured in one CUDA graph, replayed, the time divided
by the calls (`BenchCase.graph_calls`, bench_svc/benches/kernel_timing.time_graph_ms); the PyTorch alternative is
captured the same way. A graph replays its calls back to back, so each case rotates through enough copies of what
it reads (weights, the KV cache) to exceed the L2 cache (ROTATE_BYTES): every call reads cold memory, as one
layer's weights are in a real decode step.

- decode attention, judged on the K/V bytes read, beside SDPA with a padded boolean mask over the same cache (given
  its best case: the slots are 0..B-1 so it reads the cache in place, no gather);
- weight-only matmul at every linear width of the `large` and `gpt2-124m` presets (computed from model/presets.py)
  and M = 1 and 16, INT8 and INT4 in groups of 32 (`model.quantize`'s default), judged on the weight + scale bytes
  read, beside the bf16 cuBLAS `F.linear` of the same shape; at the lm_head and M = 1 (the INT4 target's row) also
  INT4 in groups of 128. Each further group size or M costs an autotuning pass per shape (12 configs at M 1, 11-23 at
  M 2..16, each compiled and timed): with groups 64 and 128 everywhere and M 4 and 64 at the lm_head (and 10-15
  configs), `--only decode,wo_matmul` did not finish in 150 s on the H200;
- end to end, one decode step of the `large` preset (random weights, batch 1, position 512 of a 1024-key cache)
  through `GPT.forward_cached` with bf16 weights, and with its linears swapped by model/quantize.py for INT8 and INT4
  (whose matmuls are the kernels above): the row's ms is decode ms/token.
Targets: see kernels/wo_matmul.py and kernels/decode_attention.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.bench_common import BenchCase
from kernels.decode_attention import decode_attention_triton
from kernels.quant_format import pack_int4, pack_int8
from kernels.wo_matmul import int4_matmul_triton, int8_matmul_triton

__all__ = ["DECODE_STEP_FORMATS", "bench_cases", "graph_calls", "matmul_shapes", "rotating", "rotation_copies"]

HEAD_DIM = 64
N_LAYER = 2  # the cache buffer holds several layers; the kernels read layer 1's strided view
# (batch, context, query heads, KV heads): the targets' two shapes at 6 heads, then 12 heads (gpt2-124m's MHA and
# the `large` preset's GQA, 12 q / 4 kv).
DECODE_SHAPES = ((64, 1024, 6, 6), (1, 8192, 6, 6), (64, 1024, 12, 12), (1, 8192, 12, 4), (64, 1024, 12, 4))
MATMUL_PRESETS = ("large", "gpt2-124m")
MATMUL_M = (1, 16)  # tokens in flight: every width at each
MATMUL_INT4_GROUP = 32  # model.quantize.quantize_model's default group size: at every width
LM_HEAD_INT4_GROUPS = (128,)  # ... and these at the lm_head, M = 1
ROTATE_BYTES = 192 * 1024**2  # > 3x the L2 of an H100 (50 MB) or H200 (60 MB)
MAX_COPIES = 1024  # the most copies of one input (graph nodes per replay)
MIN_GRAPH_CALLS = 32
DECODE_STEP_PRESET = "large"
DECODE_STEP_POSITION = 512  # the token's position: it attends to 513 of the cache's 1024 keys
DECODE_STEP_CALLS = 4
DECODE_STEP_FORMATS = ("bf16", "int8", "int4-g32")


def rotation_copies(bytes_per_call: int) -> int:
    """How many copies of a call's inputs make the graph's working set exceed L2 (at least 1, at most MAX_COPIES)."""
    return max(1, min(MAX_COPIES, -(-ROTATE_BYTES // max(bytes_per_call, 1))))


def graph_calls(bytes_per_call: int) -> int:
    """Calls per captured graph: every copy once, and at least MIN_GRAPH_CALLS."""
    copies = rotation_copies(bytes_per_call)
    return copies * -(-MIN_GRAPH_CALLS // copies)


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One call per invocation, cycling through `calls` (each reads its own copy of the inputs)."""
    state = {"i": 0}

    def call() -> object:
        i = state["i"]
        state["i"] = (i + 1) % len(calls)
        return calls[i]()

    return call


def _decode_inputs(batch: int, ctx: int, n_head: int, n_kv: int):
    """q (B, H, D) bf16 and layer 1 of (B, N_LAYER, n_kv, ctx, D) caches, every sequence full (length ctx)."""
    shape = (batch, N_LAYER, n_kv, ctx, HEAD_DIM)
    k_buf = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_buf = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, n_head, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lengths = torch.full((batch,), ctx, device="cuda", dtype=torch.long)
    return q, k_buf[:, 1], v_buf[:, 1], lengths


def _kv_bytes(shape: tuple[int, int, int, int]) -> int:
    batch, ctx, _, n_kv = shape
    return 2 * batch * n_kv * ctx * HEAD_DIM * 2  # K and V, 2 bytes each


def _decode_setup(shape: tuple[int, int, int, int], impl: str) -> Callable[[], Callable[[], object]]:
    def one_copy() -> Callable[[], object]:
        q, k, v, lengths = _decode_inputs(*shape)
        if impl == "triton":
            return lambda: decode_attention_triton(q, k, v, None, lengths)  # slots None: row b in slot b
        ctx = k.shape[2]
        mask = (torch.arange(ctx, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
        q4 = q[:, :, None, :]  # (B, H, 1, D)
        gqa = q.shape[1] != k.shape[1]
        return lambda: F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, enable_gqa=gqa)

    return lambda: rotating([one_copy() for _ in range(rotation_copies(_kv_bytes(shape)))])


def _decode_cases() -> list[BenchCase]:
    cases = []
    for shape in DECODE_SHAPES:
        batch, ctx, n_head, n_kv = shape
        label = f"B{batch} ctx{ctx} H{n_head}/KV{n_kv} D{HEAD_DIM} bf16"
        moved, calls = _kv_bytes(shape), graph_calls(_kv_bytes(shape))
        for impl, ours in (("triton", True), ("sdpa padded mask", False)):
            setup = _decode_setup(shape, impl)
            cases.append(BenchCase("decode_attention", label, impl, ours, setup, bytes_moved=moved, graph_calls=calls))
    return cases


def matmul_shapes() -> list[tuple[str, int, int]]:
    """(name, K, N) of every distinct linear layer of the MATMUL_PRESETS (model/presets.py), in model order."""
    from model.presets import get_preset  # model imports kernels: imported here, not at module load

    shapes: dict[tuple[int, int], str] = {}
    for preset in MATMUL_PRESETS:
        cfg = get_preset(preset)
        c, kv, hidden = cfg.n_embd, cfg.kv_dim, cfg.hidden_dim
        up = "gate/up" if cfg.mlp == "swiglu" else "up"
        layers = (("q/o", c, c), ("k/v", c, kv), (f"mlp {up}", c, hidden), ("mlp down", hidden, c))
        for name, k, n in layers:
            shapes.setdefault((k, n), f"{preset} {name}")
        shapes.setdefault((c, cfg.vocab_size), "lm_head")
    return [(name, k, n) for (k, n), name in shapes.items()]


def _weight_bytes(k: int, n: int, fmt: str) -> int:
    if fmt == "bf16":
        return 2 * n * k
    if fmt == "int8":
        return n * k + 4 * n
    group_size = int(fmt.removeprefix("int4-g"))
    return n * k // 2 + 4 * n * (k // group_size)


def _matmul_setup(m: int, k: int, n: int, fmt: str) -> Callable[[], Callable[[], object]]:
    """fmt: "bf16", "int8" or "int4-g<group size>"; one quantised weight, copied to defeat L2 across graph calls."""

    def setup() -> Callable[[], object]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") / k**0.5
        copies = rotation_copies(_weight_bytes(k, n, fmt))
        if fmt == "bf16":
            weights = [w.bfloat16() for _ in range(copies)]
            return rotating([lambda w=wc: F.linear(x, w) for wc in weights])
        if fmt == "int8":
            q, scale = pack_int8(w)
            packs = [(q.clone(), scale.clone()) for _ in range(copies)]
            return rotating([lambda p=p: int8_matmul_triton(x, *p) for p in packs])
        group_size = int(fmt.removeprefix("int4-g"))
        packed, scales = pack_int4(w, group_size)
        packs = [(packed.clone(), scales.clone()) for _ in range(copies)]
        return rotating([lambda p=p: int4_matmul_triton(x, *p, group_size) for p in packs])

    return setup


def _matmul_cases() -> list[BenchCase]:
    shapes = matmul_shapes()
    dims = {name: (k, n) for name, k, n in shapes}
    runs = [(m, name) for m in MATMUL_M for name, _, _ in shapes]
    cases = []
    for m, name in runs:
        k, n = dims[name]
        label = f"M{m} {k}->{n} ({name})"
        groups = (MATMUL_INT4_GROUP, *(LM_HEAD_INT4_GROUPS if (m, name) == (1, "lm_head") else ()))
        for fmt, ours in [("int8", True), *((f"int4-g{g}", True) for g in groups), ("bf16", False)]:
            moved = _weight_bytes(k, n, fmt)
            impl = f"triton {fmt}" if ours else "torch bf16 matmul"
            setup = _matmul_setup(m, k, n, fmt)
            cases.append(
                BenchCase("wo_matmul", label, impl, ours, setup, bytes_moved=moved, graph_calls=graph_calls(moved))
            )
    return cases


def _decode_step_setup(fmt: str) -> Callable[[], Callable[[], object]]:
    """One cached decode step of the DECODE_STEP_PRESET with random weights, its linears in `fmt`."""

    def setup() -> Callable[[], object]:
        from model.kv_cache import KVCache  # model imports kernels: imported here, not at module load
        from model.presets import get_preset
        from model.quantize import quantize_model
        from model.transformer import GPT

        cfg = get_preset(DECODE_STEP_PRESET)
        torch.manual_seed(0)
        with torch.device("cuda"):  # initialised on the GPU: seconds faster than on the CPU for ~190M parameters
            model = GPT(cfg)
        model = model.to(dtype=torch.bfloat16).eval()
        if fmt != "bf16":
            mode = "int8" if fmt == "int8" else "int4"
            group_size = 32 if fmt == "int8" else int(fmt.removeprefix("int4-g"))
            model = quantize_model(model, mode, group_size)  # in place: nn.Linear -> Int8Linear / Int4Linear
        cache = KVCache(1, cfg, dtype=torch.bfloat16, device="cuda")
        idx = torch.randint(cfg.vocab_size, (1, 1), device="cuda")
        slots = torch.zeros(1, dtype=torch.long, device="cuda")
        positions = torch.full((1,), DECODE_STEP_POSITION, dtype=torch.long, device="cuda")

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return model.forward_cached(idx, cache, slots, positions, last_only=True)  # (1, V)

        return step

    return setup


def _decode_step_bytes(fmt: str) -> int:
    """Weight bytes one decode step reads (every linear, the lm_head included; embeddings and norms left out)."""
    from model.presets import get_preset

    cfg = get_preset(DECODE_STEP_PRESET)
    c, kv, hidden = cfg.n_embd, cfg.kv_dim, cfg.hidden_dim
    per_layer = [(c, c), (c, kv), (c, kv), (c, c), (c, hidden), (c, hidden), (hidden, c)]
    return cfg.n_layer * sum(_weight_bytes(k, n, fmt) for k, n in per_layer) + _weight_bytes(c, cfg.vocab_size, fmt)


def _decode_step_cases() -> list[BenchCase]:
    label = f"{DECODE_STEP_PRESET} preset B1 pos{DECODE_STEP_POSITION} (ms/token)"
    cases = []
    for fmt in DECODE_STEP_FORMATS:
        setup, moved = _decode_step_setup(fmt), _decode_step_bytes(fmt)
        impl = f"{fmt} weights" + (" (torch)" if fmt == "bf16" else " (triton wo_matmul)")
        cases.append(
            BenchCase(
                "decode step", label, impl, fmt != "bf16", setup, bytes_moved=moved, graph_calls=DECODE_STEP_CALLS
            )
        )
    return cases


def bench_cases() -> list[BenchCase]:
    """Decode attention, weight-only matmul and decode-step cases (setup allocates on the GPU: call it there only)."""
    return _decode_cases() + _matmul_cases() + _decode_step_cases()
