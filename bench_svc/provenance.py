"""Where a measured figure came from: the device, the git commit of the code, the exact command, the machine's load
and the time. The one place every benchmark takes these from (STYLE.md 13).

The GPU machine gets a copy of the working tree without `.git`, so a script that runs there passes the commit it
was sent from in `TINYLM_GIT_COMMIT` (tools/gpu_session.sh does); that value wins over asking git.
Imports nothing heavier than the standard library (torch only where a GPU is named), so every package can stamp
its figures without pulling in the rest of the harness.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "COMMIT_ENV",
    "LOAD_KEYS",
    "Anchor",
    "RunHeader",
    "RunInfo",
    "cpu_device_name",
    "device_name",
    "device_slug",
    "git_commit",
    "gpu_slug",
    "machine_load",
    "make_header",
    "now_iso",
]

COMMIT_ENV = "TINYLM_GIT_COMMIT"
# The names a result file's header gives the load average under (ours first; older files and other layouts after).
LOAD_KEYS = ("load_avg", "load_1m", "load_average")
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
    """ "cpu: <model name> x<logical cores>", from /proc/cpuinfo where there is one."""
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


def device_slug(device: str) -> str:
    """A file-name-safe form of a device name: "cpu: AMD EPYC x2" -> "cpu-amd-epyc-x2"."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return slug or "unknown"


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the kernels' and trainer's file names)."""
    slug = device_slug(name)
    return "unknown-gpu" if slug == "unknown" else slug


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes): a figure taken on a busy machine says so. None where the
    platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def now_iso() -> str:
    """The time now, ISO 8601 with the local time zone, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunInfo:
    """Where and how a GPU run's figures were taken (the kernels' and trainer's result layout: a `run` block)."""

    gpu: str  # torch.cuda.get_device_name()
    commit: str  # git commit of the code measured
    command: str  # the exact command line
    timestamp: str  # ISO 8601, UTC
    torch_version: str


@dataclass(frozen=True)
class Anchor:
    """The baseline of a table, measured in the same run: `name` says what it is, `value` its figure."""

    name: str
    value: float | None = None
    unit: str = ""

    def __str__(self) -> str:
        if self.value is None:
            return self.name
        return f"{self.name} = {self.value:.4g} {self.unit}".rstrip()


@dataclass(frozen=True)
class RunHeader:
    """Where, with what code, how and on how busy a machine a result was measured."""

    device: str  # "NVIDIA H100 80GB HBM3" or "cpu: AMD EPYC x2"
    git_commit: str  # sha, "+dirty" when the tree had changes, or "unknown"
    command: tuple[str, ...]  # the exact argv
    created: str  # ISO 8601 with time zone
    anchor: Anchor
    load_avg: float | None = None  # 1-minute load average when the header was made

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["command"] = list(self.command)
        return out


def make_header(
    device: str, repo: Path, command: Sequence[str], anchor: Anchor, *, commit: str | None = None
) -> RunHeader:
    """A header stamped now (time and load), with `commit` (the run's, taken once at its start), else the commit of
    `repo` now."""
    return RunHeader(
        device=device,
        git_commit=commit or git_commit(repo),
        command=tuple(command),
        created=now_iso(),
        anchor=anchor,
        load_avg=machine_load(),
    )
