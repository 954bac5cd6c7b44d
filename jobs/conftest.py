"""Fixtures of the jobs tests: a fresh real redis-server per test, and a queue on it."""

from collections.abc import Iterator

import pytest

from jobs.connection import ConnectionConfig
from jobs.queue import JobQueue
from jobs.testing import RedisServer

# Few, quick reconnects: a test that loses Redis on purpose should hear about it in well under a second.
FAST_FAIL = ConnectionConfig(retries=2, backoff_base_s=0.02, backoff_cap_s=0.05, connect_timeout_s=0.5)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def queue(redis_server: RedisServer) -> Iterator[JobQueue]:
    with JobQueue(redis_server.url) as job_queue:
        yield job_queue
