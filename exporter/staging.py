"""Atomic publishing into an artifact folder: build everything in a temp folder beside it, then rename.

Every export output is written under `<artifact>/.export-XXXX/` first. `publish` moves each finished entry
into the artifact with `os.rename` (same filesystem, so readers see the old entry or the new one, never half
of one); a folder that already exists is renamed aside first and deleted after. Whatever happens, the temp
folder is removed on exit, so a failed export leaves the artifact exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["STAGING_PREFIX", "Staging", "dir_bytes"]

STAGING_PREFIX = ".export-"


def dir_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Staging:
    """`with Staging(artifact_dir) as s:` write under `s.root`, then `s.publish([...names])`."""

    def __init__(self, artifact_dir: Path) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.root = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.artifact_dir))

    def __enter__(self) -> "Staging":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def folder(self, name: str) -> Path:
        """A fresh subfolder of the staging area, published later as `<artifact>/<name>`."""
        path = self.root / name
        path.mkdir()
        return path

    def publish(self, names: list[str]) -> None:
        """Move the staged entries `names` into the artifact folder, replacing what is there."""
        for name in names:
            staged, final = self.root / name, self.artifact_dir / name
            if staged.is_dir() and final.exists():
                old = self.root / f".old-{name}"
                os.rename(final, old)
                os.rename(staged, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, final)  # a file: one atomic replace
