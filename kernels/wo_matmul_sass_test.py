"""Tests for kernels/wo_matmul_sass.py: the K loop's SASS counts (parsing on a fixed listing; real sm_90 builds in a
subprocess without TRITON_INTERPRET, kernels/sm90_compile_test.build_in_subprocess)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from kernels.sm90_compile_test import _nvidia_backend_available, build_in_subprocess
from kernels.wo_matmul_sass import candidates, launch_values, load_module, loop_body, main, parse_sass

# cuobjdump -sass lines: a prologue, a loop from 0x0100 to its backward branch at 0x0160, an exit after it
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;              /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;    /* 0x000000040204798 */
        /*0100*/                   LDS.128 R8, [R0+0x100] ;
        /*0110*/                   SHF.R.U32.HI R9, RZ, 0x4, R8 ;
        /*0120*/                   LOP3.LUT R9, R9, 0x780000, R12, 0x78, !PT ;
        /*0130*/                   FFMA R20, R9, R10, R20 ;
        /*0140*/                   NOP ;
        /*0150*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0160*/              @!P0 BRA 0x100 ;
        /*0170*/                   FFMA R21, R9, R10, R21 ;
        /*0180*/                   EXIT ;
        /*0190*/                   BRA 0x190;
"""


def test_loop_body_counts_the_backward_branch_range():
    instructions = parse_sass(LISTING)
    assert [op for _, op, _ in instructions][:2] == ["MOV", "LDG.E.128"] and len(instructions) == 12
    body = loop_body(instructions)  # the self-branch at 0x190 is a 1-instruction loop: the longest one wins
    assert body == {"LDS": 1, "SHF": 1, "LOP3": 1, "FFMA": 1, "BAR": 1, "other": 1}  # NOP left out, BRA is "other"
    with pytest.raises(ValueError, match="no backward branch"):
        loop_body(instructions[:2])


def test_launch_values_are_the_launchers():
    # INT4 at groups of 32: bytes K / 2 per row, scales (N, K / 32) contiguous; INT8: one scale per channel
    v = launch_values(16, 50304, 768, 4, 32)
    assert (v["KH"], v["stride_wn"], v["stride_sn"], v["stride_sg"], v["one_bits"]) == (384, 384, 24, 1, 0x3F800000)
    v = launch_values(1, 768, 2048, 8, 1)
    assert (v["KH"], v["stride_sn"], v["stride_sg"], v["one_bits"]) == (2048, 1, 0, 0x3FC00000)


def test_other_versions_of_the_kernel_module_load_from_a_file():
    # --module: a file holding a version of kernels/wo_matmul.py (here today's, by its path) loads as its own module;
    # kernels from before split-K (8c88389) have no max_split, and their candidate_configs no split limit.
    from kernels import wo_matmul

    copy = load_module(wo_matmul.__file__)
    assert copy is not wo_matmul and copy.CANDIDATES == tuple(copy.WoConfig(**vars(c)) for c in wo_matmul.CANDIDATES)
    assert candidates(copy, 16, 50304, 768, "int4-g32") == [
        copy.WoConfig(**vars(c)) for c in candidates(wo_matmul, 16, 50304, 768, "int4-g32")
    ]
    calls = []
    before_split_k = SimpleNamespace(candidate_configs=lambda *args: calls.append(args) or [])
    assert candidates(before_split_k, 3, 768, 2048, "int8") == [] and calls == [(4, 2048, 1, True)]


def test_rejects_an_unknown_format():
    with pytest.raises(SystemExit):
        main(["--format", "int3"])


# the builds of the last test: the FMA tile and the three dot tiles (per-word scales, group scales, byte loads) of
# BLOCK_N 64, BLOCK_K 128 at 4 warps, INT4-g32 at M 16, N 4096, K 768
BUILT = ("block_n=16, block_k=256, use_dot=False", "block_n=64, block_k=128, use_dot=True, num_warps=4")


def _configs() -> list:
    from kernels import wo_matmul

    return [c for c in candidates(wo_matmul, 16, 4096, 768, "int4-g32") if any(b in repr(c) for b in BUILT)]


def _build_all() -> None:
    """Subprocess entry (build_in_subprocess): one JSON line per build."""
    from kernels.wo_matmul_sass import build

    for c in _configs():
        print(json.dumps({"name": repr(c), **build(c, 16, 4096, 768, "int4-g32")}), flush=True)


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend to compile with")
def test_fma_and_dot_loops_count_their_inner_products():
    # At M 16 the FMA path multiplies each weight by 16 rows of x: at least 16 FFMA per weight, 500 warp FFMA per 1k
    # weights; the dot path dequantises each weight once (one FFMA: 31.25 per 1k) and multiplies on the tensor cores.
    builds = build_in_subprocess("kernels.wo_matmul_sass_test", len(_configs()))
    fma = [b for b in builds if "use_dot=False" in b["name"]]
    dot = [b for b in builds if "use_dot=True" in b["name"]]
    assert len(fma) == 1 and fma[0]["mix"]["FFMA"] >= 500 and "MMA" not in fma[0]["mix"]
    assert len(dot) == 3  # per-word scales, group scales, byte loads
    for row in dot:
        assert row["mix"]["MMA"] > 0 and row["mix"].get("FFMA", 0) < 100 and row["spill_bytes"] == 0
        assert row["per_1k_weights"] < fma[0]["per_1k_weights"] and row["issue_bound_us"] > 0
