"""Connecting to Redis with bounded retries, and turning a lost Redis into one clear error."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs.errors import QueueUnavailable

__all__ = ["ConnectionConfig", "connect", "unavailable_as_error"]


@dataclass(frozen=True)
class ConnectionConfig:
    """How hard a call tries before it gives up: `retries` reconnects, backoff doubling from base to cap."""

    retries: int = 6
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0
    socket_timeout_s: float = 10.0  # longer than any BLOCK the queue issues (at most 1 s)
    connect_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("backoff_base_s", "backoff_cap_s", "socket_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _describe(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def connect(target: Union[str, redis.Redis], config: ConnectionConfig) -> tuple[redis.Redis, str]:
    """A client (bytes replies) and the URL to name in errors, from a URL or a caller's own client."""
    if isinstance(target, str):
        client = redis.Redis.from_url(
            target,
            retry=Retry(ExponentialBackoff(cap=config.backoff_cap_s, base=config.backoff_base_s), config.retries),
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
        )
        return client, target
    if not isinstance(target, redis.Redis):
        raise TypeError(f"redis must be a URL string or a redis.Redis client, got {type(target).__name__}")
    if target.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError("the redis client must have decode_responses=False (jobs are binary protobufs)")
    return target, _describe(target)


@contextlib.contextmanager
def unavailable_as_error(url: str) -> Iterator[None]:
    """Re-raise redis-py's connection and timeout errors (after its own retries) as QueueUnavailable."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise QueueUnavailable(f"Redis at {url} is unavailable after retries: {error}") from error
