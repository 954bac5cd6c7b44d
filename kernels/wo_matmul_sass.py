"""The weight-only matmul's K loop in sm_90 SASS, without a GPU (issue 18m): each candidate config of an (M bucket, N,
K, format) built as a real launch specialises it (the launcher's divisibility hints on pointers and on integers that
are multiples of 16, integers equal to 1 as constants), its loop (the body of the backward branch) counted by
instruction class per 1,000 weights of one K step, in warp instructions (body x warps / (BLOCK_N x BLOCK_K)). The
"issue bound" is N x K weights at that rate over 132 SMs issuing 4 warp instructions per clock at 1.98 GHz (an H100 /
H200): a floor, not a prediction.

It builds with whatever triton is installed: the GPU machine runs triton 3.6 (shared/TOOLCHAIN.md), this venv 3.7.1,
and the two lay the INT4 word dot out differently (kernels/README.md, "18m: the M=16 SASS"). Run without
TRITON_INTERPRET:

    python -m kernels.wo_matmul_sass --m 16 --n 50304 --k 768 --format int4-g32 [--only use_dot=True] [--json]

`--module FILE` builds another version of kernels/wo_matmul.py instead (`git show REV:kernels/wo_matmul.py > FILE`):
older kernels take fewer constexprs and arguments, and their `candidate_configs` no split limit.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import sys
from pathlib import Path

from kernels.sm90_build import compile_sm90, cuobjdump, resources

SMS, ISSUE_PER_CLOCK, CLOCK_HZ = 132, 4, 1.98e9
FORMATS = {"int8": (8, 1), "int4-g32": (4, 32), "int4-g64": (4, 64), "int4-g128": (4, 128)}
# instruction classes, first match wins (opcode prefixes)
CLASSES = (
    ("LDG", r"LDG(?!DEPBAR|STS)"),
    ("LDGSTS", r"LDGSTS"),
    ("LDS", r"LDS"),
    ("STS", r"STS"),
    ("BAR", r"BAR\."),
    ("FFMA", r"FFMA"),
    ("FMUL/FADD", r"FMUL|FADD"),
    ("MMA", r"HMMA|HGMMA"),
    ("HFMA2", r"H(FMA|MUL|ADD)2"),
    ("LOP3", r"LOP3"),
    ("SHF", r"SHF|SHL|SHR"),
    ("I2F/F2F/PRMT", r"I2F|F2F|F2I|PRMT"),
    ("IMAD/IADD", r"IMAD|IADD|VIADD|LEA"),
)
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each instruction in cuobjdump -sass output."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_LINE.search, text.splitlines()) if m]


def loop_body(instructions: list[tuple[int, str, str]]) -> collections.Counter:
    """Instruction classes of the longest loop: from a backward branch's target to the branch (NOPs left out)."""
    loops = []
    for addr, op, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        raise ValueError("no backward branch: the kernel has no loop")
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    counts = collections.Counter()
    for addr, op, _ in instructions:
        if lo <= addr <= hi and op != "NOP":
            counts[next((name for name, pat in CLASSES if re.match(pat, op)), "other")] += 1
    return counts


def launch_values(m: int, n: int, k: int, bits: int, group: int) -> dict[str, int]:
    """The integer arguments `_launch` passes for contiguous x (M, K), packed weight, scales and output."""
    row_bytes = k if bits == 8 else k // 2
    scale_strides = (1, 0) if bits == 8 else (k // group, 1)
    return dict(
        M=m, N=n, K=k, KH=row_bytes, one_bits=0x3F800000 | (1 << 22 if bits == 8 else 0), stride_xm=k, stride_xk=1,
        stride_wn=row_bytes, stride_wk=1, stride_sn=scale_strides[0], stride_sg=scale_strides[1], stride_om=n,
        stride_on=1,
    )  # fmt: skip


def load_module(path: str | None):
    """kernels.wo_matmul, or the version of it in file `path`."""
    if path is None:
        from kernels import wo_matmul

        return wo_matmul
    spec = importlib.util.spec_from_file_location(f"wo_matmul_at_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def candidates(wo, m: int, n: int, k: int, fmt: str, words: bool = True) -> list:
    """The module's candidate configs at (M, N, K, format)."""
    import triton

    m_bucket, (_, group) = triton.next_power_of_2(m), FORMATS[fmt]
    if hasattr(wo, "max_split"):
        return wo.candidate_configs(m_bucket, k, group, words, wo.max_split(m, n))
    return wo.candidate_configs(m_bucket, k, group, words)


def build(config, m: int, n: int, k: int, fmt: str, words: bool = True, wo=None) -> dict:
    """Compile one config for sm_90 as the launch at (M, N, K, format) specialises it; its resources and loop counts.
    `wo`: the module (default kernels.wo_matmul)."""
    import triton
    import triton.language as tl

    wo = wo or load_module(None)
    bits, group = FORMATS[fmt]
    m_bucket = triton.next_power_of_2(m)
    kw = wo._triton_config(config, m_bucket).kwargs
    const = dict(M_BUCKET=m_bucket, BITS=bits, GROUP_SIZE=group, DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", **kw)
    const.update(WORDS=words)
    if hasattr(wo, "_even_k"):  # the heuristic's constexpr (kernels since 3969682)
        const.update(EVEN_K=wo._even_k(dict(K=k, **kw)))
    pointers = dict(x_ptr="*bf16", w_ptr="*i8" if bits == 8 else "*u8", scale_ptr="*fp32", out_ptr="*bf16")
    pointers.update(ws_ptr="*fp32", ticket_ptr="*i32")
    values = launch_values(m, n, k, bits, group)
    fn = wo._wo_matmul_kernel
    const = {name: v for name, v in const.items() if name in fn.arg_names}  # older kernels take fewer
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const or values.get(name) == 1:
            const.setdefault(name, 1)
            sig[name] = "constexpr"
            continue
        sig[name] = pointers.get(name, "i32")
        if name in pointers or values[name] % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = compile_sm90(fn, sig, const, config.num_warps, config.num_stages, attrs)
    regs, stack = (resources(compiled)[key] for key in ("regs", "stack"))
    sass = cuobjdump(compiled, "-sass")
    body = loop_body(parse_sass(sass))
    per_1k = 1000 * config.num_warps / (config.block_n * config.block_k)
    total = sum(body.values()) * per_1k
    return dict(
        config=repr(config), triton=triton.__version__, regs=regs, spill_bytes=stack, shared=compiled.metadata.shared,
        barriers_per_step=body["BAR"], per_1k_weights=round(total, 1), issue_bound_us=round(n * k * total / 1000 / (SMS * ISSUE_PER_CLOCK * CLOCK_HZ) * 1e6, 1),
        mix={name: round(count * per_1k, 1) for name, count in body.most_common()},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--n", type=int, default=50304)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--format", choices=sorted(FORMATS), default="int4-g32")
    p.add_argument("--bytes", action="store_true", help="the byte path's candidates (rows not word-aligned)")
    p.add_argument("--only", default="", help="keep the configs whose repr contains this text")
    p.add_argument("--json", action="store_true", help="one JSON line per build")
    p.add_argument("--module", help="a file holding another version of kernels/wo_matmul.py")
    args = p.parse_args(argv)
    wo = load_module(args.module)
    for c in (c for c in candidates(wo, args.m, args.n, args.k, args.format, not args.bytes) if args.only in repr(c)):
        row = build(c, args.m, args.n, args.k, args.format, words=not args.bytes, wo=wo)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            head = f"{row['config']}: {row['regs']} regs, {row['spill_bytes']} B spilled, {row['per_1k_weights']}"
            print(f"{head} warp instructions / 1k weights (issue bound {row['issue_bound_us']} us)\n    {row['mix']}")


if __name__ == "__main__":
    main()
