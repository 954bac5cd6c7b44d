"""`./tinylm jobs ...`: the queue CLI (jobs.cli) on TINYLM_REDIS_URL, else the Redis of the running local stack."""

from __future__ import annotations

from jobs import cli
from tools.settings import Settings
from tools.stack import read_state

__all__ = ["main"]


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    url = settings.redis_url or (read_state(settings) or {}).get("redis_url")
    return cli.main(argv, default_redis_url=url)
