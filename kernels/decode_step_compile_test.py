"""The small-batch decode kernels (decode_gemv, decode_attention_step) compile for sm_90 here, without a GPU, with
every autotune config the GEMV offers at 1, 8 and 16 rows, and the GEMV never spills registers (the budgets in
decode_gemv.py come from these builds). Uses kernels/sm90_compile_test.py's builder, in a subprocess without
TRITON_INTERPRET (triton.jit decides at import between the interpreter and the compiler)."""

from __future__ import annotations

import pytest

from kernels.sm90_compile_test import _nvidia_backend_available, build_in_subprocess

ROWS = (1, 8, 16)
_GEMV_BASE = dict(
    NORM="none",
    HAS_NORM_B=False,
    EMBED=False,
    HAS_POS=False,
    HAS_BIAS=True,
    HAS_GATE_BIAS=False,
    ACTIVATION="none",
    RESIDUAL=False,
    ONE_CHUNK=False,
)
_LN = dict(NORM="layernorm", HAS_NORM_B=True)
# (name, flags, whole-row BLOCK_K or None: chunked, logits dtype): the model's GEMVs, GPT-2 and Llama flavours
_GEMVS = (
    ("embed+LN qkv", dict(_LN, EMBED=True, HAS_POS=True, ONE_CHUNK=True), 512, "*bf16"),
    ("LN+gelu up", dict(_LN, ACTIVATION="gelu", ONE_CHUNK=True), 512, "*bf16"),
    ("LN relu2 up", dict(_LN, ACTIVATION="relu2", ONE_CHUNK=True), 512, "*bf16"),
    ("LN lm_head", dict(_LN, HAS_BIAS=False, ONE_CHUNK=True), 512, "*fp32"),
    ("RMS swiglu", dict(NORM="rmsnorm", HAS_BIAS=False, ACTIVATION="swiglu", ONE_CHUNK=True), 1024, "*bf16"),
    ("residual", dict(RESIDUAL=True), None, "*bf16"),
    ("chunked LN gelu_tanh embed", dict(_LN, ACTIVATION="gelu_tanh", EMBED=True, HAS_POS=True), None, "*bf16"),
)
# (name, n_head, n_kv_head, head_dim, rope, qk_norm)
_ATTENTION = (
    ("gpt2", 6, 6, 64, False, False),
    ("llama gqa", 12, 4, 64, True, False),
    ("qk-norm", 6, 6, 64, False, True),
)


def _specs() -> list[tuple[str, object, dict, dict, int, int]]:
    from kernels import decode_attention_step as das
    from kernels import decode_gemv as dg

    pointers = ("x_ptr", "temb_ptr", "pemb_ptr", "xout_ptr", "nw_ptr", "nb_ptr", "w_ptr", "b_ptr", "wg_ptr", "bg_ptr")
    specs = []
    for rows in ROWS:
        for name, flags, block_k, logits in _GEMVS:
            if block_k is not None and rows * block_k > dg.MAX_ONE_CHUNK_ELEMS:
                continue  # the wrapper reads such rows in chunks
            sig = {**{p: "*bf16" for p in pointers}, "res_ptr": "*bf16", "out_ptr": logits, "eps": "fp32"}
            sig.update(tok_ptr="*i64", pos_ptr="*i64")
            for cfg in dg._configs(rows, block_k):
                const = {**_GEMV_BASE, **flags, "BLOCK_M": rows, **cfg.kwargs}
                if block_k is not None:
                    const["BLOCK_K"] = block_k
                label = f"gemv {name} M{rows} {cfg.kwargs} w{cfg.num_warps}"
                specs.append((label, dg._decode_gemv_kernel, sig, const, cfg.num_warps, cfg.num_stages))
    sig = {n: "*bf16" for n in ("qkv_ptr", "k_ptr", "v_ptr", "out_ptr")}
    sig.update(slots_ptr="*i64", pos_ptr="*i64", qk_scale="fp32", log2_theta="fp32", qk_eps="fp32")
    sig.update(ws_ptr="*fp32", ticket_ptr="*i32")
    for name, heads, kv, d, rope, qk_norm in _ATTENTION:
        group = heads // kv
        block_h = 1 << (group - 1).bit_length()
        const = dict(N_HEAD=heads, N_KV=kv, GROUP=group, HEAD_DIM=d, HALF=d // 2, BLOCK_H=block_h, BLOCK_D=d)
        const.update(BLOCK_N=max(16, das.TILE_KEYS_X_HEADS // block_h), ROPE=rope, QK_NORM=qk_norm)
        for splits, split_keys in ((1, 256), (4, 64)):  # one pass; split keys merged by the last split
            const.update(SPLITS=splits, SPLIT_KEYS=split_keys, SPLITS_P2=splits)
            label = f"attention {name} splits {splits}"
            specs.append((label, das._attention_step_kernel, sig, dict(const), das.NUM_WARPS, 2))
    return specs


def _build_all() -> None:
    """Subprocess entry: one JSON line per build."""
    from kernels.sm90_compile_test import _build_all as build_all

    build_all(_specs())


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend to compile with")
def test_decode_step_kernels_compile_for_sm90_without_spills():
    builds = build_in_subprocess("kernels.decode_step_compile_test", len(_specs()))
    spilling = [b["name"] for b in builds if b["name"].startswith("gemv") and b["stack"] != 0]
    assert not spilling, spilling
