"""Compile a Triton kernel for sm_90 (H100 / H200) on any machine, no GPU needed, and read what the build holds:
registers, spilled bytes, shared memory, SASS. The compile tests (`sm90_compile_test.py` and its users) and the
weight-only matmul's SASS counter (`wo_matmul_sass.py`) build through here."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

__all__ = ["compile_sm90", "cuobjdump", "resources"]


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, attrs=None):
    """triton.compile of JIT function `fn` for sm_90: `signature` a type per argument ("constexpr" for those in
    `constexprs`), `attrs` the launcher's hints ({(index,): [["tt.divisibility", 16]]}) where a real launch gives them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, **({"attrs": attrs} if attrs else {})),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )


def cuobjdump(compiled, *flags: str) -> str:
    """Triton's bundled cuobjdump over the build's cubin (e.g. "-sass", "--dump-resource-usage")."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True).stdout


def resources(compiled) -> dict:
    """Shared bytes, registers and spilled (stack) bytes of a build (-1 where cuobjdump says nothing)."""
    match = re.search(r"REG:(\d+).*STACK:(\d+)", cuobjdump(compiled, "--dump-resource-usage"))
    regs, stack = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
    return {"shared": compiled.metadata.shared, "regs": regs, "stack": stack}
