"""What export raises: a bad request (names the field and the allowed values) or a failed parity gate."""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "GateFailed"]


class ExportError(Exception):
    """The export cannot run: unknown format, unknown or corrupt artifact, unsupported model for a format."""


class GateFailed(ExportError):
    """A parity gate failed; `report` is the full parity report (a JSON-able dict) and nothing was written."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report
