"""Where a measured figure came from: the git commit of the code that measured it, and the device it ran on.

Every benchmark stamps its results with `git_commit()`. The GPU machine gets a copy of the working tree without
`.git`, so a script that runs there passes the commit it was sent from in `TINYLM_GIT_COMMIT` (tools/gpu_session.sh
does); that value wins over asking git. Lives in `kernels/` because every package that benchmarks sits above it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["COMMIT_ENV", "cpu_device_name", "device_name", "git_commit"]

COMMIT_ENV = "TINYLM_GIT_COMMIT"
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(repo: Path = REPO_ROOT) -> str:
    """`$TINYLM_GIT_COMMIT` if set, else `git rev-parse HEAD` of `repo` with "+dirty" when `git status --porcelain`
    lists anything, else "unknown" (outside a checkout, or without git)."""
    stamped = os.environ.get(COMMIT_ENV, "").strip()
    if stamped:
        return stamped
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.strip() + ("+dirty" if dirty.strip() else "")


def cpu_device_name() -> str:
    """"cpu: <model name> x<logical cores>", from /proc/cpuinfo where there is one."""
    name = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    name = name or platform.processor() or platform.machine() or "unknown"
    return f"cpu: {name} x{os.cpu_count() or 1}"


def device_name(device: Any = "cpu") -> str:
    """The name of the device a measurement ran on (a torch.device or its string): the GPU's name for a CUDA
    device, else the CPU's."""
    if str(device).startswith("cuda"):
        import torch  # only where a GPU is asked for; torch is not needed to name a CPU

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_device_name()
