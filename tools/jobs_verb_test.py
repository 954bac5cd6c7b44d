"""`./tinylm jobs` reaches the queue of the running local stack without any flag."""

import json

from jobs.testing import RedisServer
from tools import jobs_verb, stack
from tools.settings import Settings


def test_jobs_verb_finds_the_stack_redis(tmp_path, monkeypatch, capsys):
    # With no TINYLM_REDIS_URL, `./tinylm jobs` talks to the Redis the local stack recorded.
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    monkeypatch.delenv("TINYLM_REDIS_URL", raising=False)
    with RedisServer() as redis:
        settings = Settings.from_env()
        settings.stack_dir.mkdir(parents=True)
        stack._write_state(settings, {"processes": {}, "redis_url": redis.url})
        assert jobs_verb.main(["list", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
    (settings.stack_dir / "state.json").unlink()
    assert jobs_verb.main(["list"]) == 2
    assert "no Redis" in capsys.readouterr().err
