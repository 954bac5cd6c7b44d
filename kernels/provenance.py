"""Where a measured figure came from: the git commit of the code that measured it.

Every benchmark stamps its results with `git_commit()`. The GPU machine gets a copy of the working tree without
`.git`, so a script that runs there passes the commit it was sent from in `TINYLM_GIT_COMMIT` (tools/gpu_session.sh
does); that value wins over asking git. Lives in `kernels/` because every package that benchmarks sits above it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["COMMIT_ENV", "git_commit"]

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
