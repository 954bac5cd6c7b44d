"""The weight-only matmul compiles for sm_90 here, without a GPU, with every config its autotuner may pick: each M
bucket's candidates (kernels/wo_matmul.candidate_configs, split configs included) for INT8 and INT4 (groups 32 and 128)
on the word path, and the byte path's at M 1 and 16; none spills registers. Uses kernels/sm90_compile_test.py's
builder, in a subprocess without TRITON_INTERPRET (triton.jit decides at import between the interpreter and the
compiler). Strides the launcher specialises to 1 (x's and the weight's K stride, the output's N stride) are built as
constants, as they are compiled on the GPU."""

from __future__ import annotations

import pytest

from kernels.sm90_compile_test import SM90_SHARED_BYTES, _nvidia_backend_available, build_in_subprocess

M_BUCKETS = (1, 2, 8, 16, 64)
K = 2560  # long enough for every BLOCK_K and split; 5 x 512: whole steps at some (BLOCK_K, split_k), ragged at others
FORMATS = (("int8", 8, 1), ("int4-g32", 4, 32), ("int4-g128", 4, 128))


def _specs() -> list[tuple[str, object, dict, dict, int, int]]:
    import triton.language as tl

    from kernels import wo_matmul as wo

    specs, seen = [], set()
    for name, bits, group in FORMATS:
        sig = {"x_ptr": "*bf16", "w_ptr": "*i8" if bits == 8 else "*u8", "scale_ptr": "*fp32", "out_ptr": "*bf16"}
        sig.update(ws_ptr="*fp32", ticket_ptr="*i32")
        for words in (True, False):
            for m_bucket in M_BUCKETS if words else (1, 16):
                for c in wo.candidate_configs(m_bucket, K, group, words, wo.MAX_SPLIT_K):
                    kw = wo._triton_config(c, m_bucket).kwargs
                    const = dict(BITS=bits, GROUP_SIZE=group, DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", **kw)
                    const.update(WORDS=words, stride_xk=1, stride_wk=1, stride_on=1)
                    const.update(EVEN_K=wo._even_k(dict(K=K, **kw)))  # as the heuristic sets it at K
                    key = (name, words, c, kw["BLOCK_M"])  # M_BUCKET only keys the autotuner
                    if key in seen:
                        continue
                    seen.add(key)
                    const.update(M_BUCKET=m_bucket)
                    path = "words" if words else "bytes"
                    label = f"{name} {path} BM{kw['BLOCK_M']} {c}"
                    specs.append((label, wo._wo_matmul_kernel, sig, const, c.num_warps, c.num_stages))
    return specs


def _build_all() -> None:
    """Subprocess entry: one JSON line per build."""
    from kernels.sm90_compile_test import _build_all as build_all

    build_all(_specs())


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend to compile with")
def test_wo_matmul_compiles_for_sm90_without_spills():
    builds = build_in_subprocess("kernels.wo_matmul_compile_test", len(_specs()))
    too_big = [b["name"] for b in builds if b["shared"] > SM90_SHARED_BYTES]
    assert not too_big, too_big
    spilling = [f"{b['name']}: {b['stack']} B, {b['regs']} regs" for b in builds if b["stack"] != 0]
    assert not spilling, "\n".join(spilling)
