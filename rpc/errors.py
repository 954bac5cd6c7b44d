"""Aborting a gRPC call with the house's error conventions: name the field and the allowed range."""

from __future__ import annotations

from typing import NoReturn

import grpc

__all__ = ["invalid_argument", "not_found", "resource_exhausted"]


def invalid_argument(context: grpc.ServicerContext, field: str, message: str) -> NoReturn:
    """INVALID_ARGUMENT whose message starts with the field: `temperature: must be >= 0, got -1`."""
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")


def not_found(context: grpc.ServicerContext, what: str) -> NoReturn:
    """NOT_FOUND for a missing model or job: `model 'abc123' not found; known: ...`."""
    context.abort(grpc.StatusCode.NOT_FOUND, what)


def resource_exhausted(context: grpc.ServicerContext, what: str) -> NoReturn:
    """RESOURCE_EXHAUSTED for a full queue."""
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, what)
