"""Where the CLI finds things: the only place outside service entry points that reads tinylm's environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    home: Path  # TINYLM_HOME, default ~/.tinylm: artifacts/, stack/, results/
    redis_url: str | None  # TINYLM_REDIS_URL: an existing Redis; None means the launcher starts one
    corpus: str | None  # TINYLM_CORPUS: the training text; None means the canonical download

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("TINYLM_HOME") or Path.home() / ".tinylm").expanduser()
        return cls(
            home=home,
            redis_url=os.environ.get("TINYLM_REDIS_URL") or None,
            corpus=os.environ.get("TINYLM_CORPUS") or None,
        )

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def stack_dir(self) -> Path:
        return self.home / "stack"
