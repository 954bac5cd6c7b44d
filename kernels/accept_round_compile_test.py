"""The accept-round kernel compiles for sm_90 here, without a GPU (the interpreter is lenient about types and control
flow: runtime `if`s inside the position loop, loop-carried masks, tl.sort on int64), at the `tiny` target's vocabulary
(65) and the widest the wrapper accepts (8,192), k = 4 and 8, with and without the penalty; registers and spills are
reported (-s shows them). Uses kernels/sm90_compile_test.py's builder in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest

from kernels.sm90_compile_test import _nvidia_backend_available, build_in_subprocess

_SHAPES = ((65, 4), (256, 8), (8192, 4))  # (vocab, k)


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
    return specs


def _build_all() -> None:
    """Subprocess entry: one JSON line per build."""
    from kernels.sm90_compile_test import _build_all as build_all

    build_all(_specs())


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend to compile with")
def test_accept_round_compiles_for_sm90_and_small_vocabularies_do_not_spill():
    """Every shape builds; at the vocabularies speculative decoding serves here (65, 256) nothing spills to the stack;
    the widest (8,192 ids: a 64-value-a-thread sort, float64 scans) is reported, not bounded."""
    builds = build_in_subprocess("kernels.accept_round_compile_test", len(_specs()))
    for b in builds:
        print(f"{b['name']}: {b['regs']} registers, {b['stack']} B stack, {b['shared']} B shared")
    small = [b for b in builds if not b["name"].startswith("accept round v8192")]
    assert len(small) == 4 and all(b["stack"] == 0 for b in small), small
