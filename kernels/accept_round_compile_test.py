"""The accept-round kernel compiles for sm_90 here, without a GPU (the interpreter is lenient about types and control
flow: runtime `if`s inside the position loop, loop-carried masks, tl.sort on int64), at the `tiny` target's vocabulary
(65) and the widest the wrapper accepts (8,192), k = 4 and 8, with and without the penalty; so do the draft step's
kernel (`draft_sample`: float32 and bfloat16 logits, with and without the penalty) at 65 and 256, `uniform_grid`'s, and
the round's tail (`finish_round`: greedy mode on float32 and bfloat16 logits at 65 and 256, given mode; with the
draft's carried token);
registers and spills are reported (-s shows them). Uses kernels/sm90_compile_test.py's builder in a subprocess without
TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest

from kernels.sm90_compile_test import _nvidia_backend_available, build_in_subprocess

_SHAPES = ((65, 4), (256, 8), (8192, 4))  # (vocab, k)
_DRAFT_VOCABS = (65, 256)


def _specs() -> list[tuple[str, object, dict, dict, int, int]]:
    import triton

    from kernels import accept_round as ar

    sig = dict(logits_ptr="*fp32", drafts_ptr="*i64", q_ptr="*fp32", ua_ptr="*fp32", un_ptr="*fp32")
    sig.update(greedy_ptr="*u8", temperature_ptr="*fp32", top_k_ptr="*i64", top_p_ptr="*fp32", seen_ptr="*u8")
    sig.update(penalty_ptr="*fp32", p_ptr="*fp32", accepted_ptr="*i64", tokens_ptr="*i64", context_ptr="*u8")
    sig.update({s: "i64" for s in ("stride_lb", "stride_lj", "stride_d", "stride_qb", "stride_qj", "stride_s")})
    sig.update(stride_ua="i64", stride_un="i64")
    specs = []
    for vocab, k in _SHAPES:
        vp = triton.next_power_of_2(vocab)
        const = dict(K=k, KP=triton.next_power_of_2(k + 1), V=vocab, VP=vp, IDX_BITS=max(1, (vp - 1).bit_length()))
        for penalty in (False, True):
            label = f"accept round v{vocab} k{k}{' penalty' if penalty else ''}"
            specs.append((label, ar._accept_round_kernel, sig, dict(const, PENALTY=penalty), ar.num_warps(vp), 1))
    draft_sig = dict(blocked_ptr="*u8", u_ptr="*fp32", greedy_ptr="*u8", temperature_ptr="*fp32", top_k_ptr="*i64")
    draft_sig.update(top_p_ptr="*fp32", seen_ptr="*u8", penalty_ptr="*fp32", q_ptr="*fp32", token_ptr="*i64")
    draft_sig.update(seen_out_ptr="*u8", stride_l="i64", stride_u="i64", stride_s="i64")
    for vocab in _DRAFT_VOCABS:
        vp = triton.next_power_of_2(vocab)
        const = dict(V=vocab, VP=vp, IDX_BITS=max(1, (vp - 1).bit_length()))
        for dtype in ("fp32", "bf16"):
            for penalty in (False, True):
                label = f"draft sample v{vocab} {dtype}{' penalty' if penalty else ''}"
                kernel_sig = dict(draft_sig, logits_ptr=f"*{dtype}")
                specs.append(
                    (label, ar._draft_sample_kernel, kernel_sig, dict(const, PENALTY=penalty), ar.num_warps(vp), 1)
                )
    grid_sig = dict(seed_ptr="*i64", pos_ptr="*i64", offsets_ptr="*i64", out_ptr="*fp32", N="i32")
    specs.append(("uniform grid", ar._uniform_grid_kernel, grid_sig, dict(BLOCK=16), 4, 1))
    specs += _finish_specs(ar)
    return specs


def _finish_specs(ar) -> list[tuple[str, object, dict, dict, int, int]]:
    """`finish_round`'s kernel: greedy mode at each draft vocabulary (float32 and bfloat16 logits), given mode; k 4."""
    import triton

    sig = {p: "*i64" for p in ("rows_ptr", "x0_ptr", "pos_ptr", "drafts_ptr", "accepted_ptr", "tokens_ptr")}
    sig.update({p: "*i64" for p in ("token_state_ptr", "pos_state_ptr", "prev_state_ptr", "out_ptr")})
    sig.update(blocked_ptr="*u8", scratch="i64")
    sig.update({s: "i64" for s in ("stride_d", "stride_lb", "stride_lj", "stride_t", "stride_ts", "stride_ps")})
    sig.update(stride_pv="i64", stride_o="i64")
    k = 4
    const = dict(K=k, KP=triton.next_power_of_2(k + 1), PREV=True)
    specs = []
    for vocab in _DRAFT_VOCABS:
        vp = triton.next_power_of_2(vocab)
        for dtype in ("fp32", "bf16"):
            label = f"finish round v{vocab} {dtype}"
            kernel_sig = dict(sig, logits_ptr=f"*{dtype}")
            specs.append(
                (
                    label,
                    ar._finish_round_kernel,
                    kernel_sig,
                    dict(const, V=vocab, VP=vp, GREEDY=True),
                    ar.num_warps(vp),
                    1,
                )
            )
    given = dict(const, V=1, VP=1, GREEDY=False)
    specs.append(("finish round given", ar._finish_round_kernel, dict(sig, logits_ptr="*fp32"), given, 1, 1))
    return specs


def _build_all() -> None:
    """Subprocess entry: one JSON line per build."""
    from kernels.sm90_compile_test import _build_all as build_all

    build_all(_specs())


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend to compile with")
def test_accept_round_compiles_for_sm90_and_small_vocabularies_do_not_spill():
    """Every shape builds; at the vocabularies speculative decoding serves here (65, 256) nothing spills to the stack
    (the accept round, the draft step, the uniforms, the round's tail); the widest accept round (8,192 ids: a 64-value-a-thread sort,
    float64 scans) is reported, not bounded."""
    builds = build_in_subprocess("kernels.accept_round_compile_test", len(_specs()))
    for b in builds:
        print(f"{b['name']}: {b['regs']} registers, {b['stack']} B stack, {b['shared']} B shared")
    small = [b for b in builds if not b["name"].startswith("accept round v8192")]
    finish = 2 * len(_DRAFT_VOCABS) + 1
    assert len(small) == 4 + 4 * len(_DRAFT_VOCABS) + 1 + finish and all(b["stack"] == 0 for b in small), small
