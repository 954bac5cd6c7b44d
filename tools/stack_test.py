"""The local stack launcher cleans up after itself: a failed `up` leaves nothing running (issue 22, finding 3),
and `status` says which part is down (finding 7)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from tools import stack
from tools.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    monkeypatch.delenv("TINYLM_REDIS_URL", raising=False)
    return Settings.from_env()


def _spy_popen(monkeypatch) -> list[subprocess.Popen]:
    started: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(stack.subprocess, "Popen", popen)
    return started


def test_a_redis_that_never_answers_is_stopped(settings, monkeypatch):
    started = _spy_popen(monkeypatch)

    def unreachable(*args, **kwargs):
        raise OSError("connection refused")

    clock = iter(range(0, 10**6, 2))  # every look at the clock is 2 s later: the 10-s wait ends at once
    monkeypatch.setattr(stack.socket, "create_connection", unreachable)
    monkeypatch.setattr(stack, "time", SimpleNamespace(monotonic=lambda: next(clock), sleep=time.sleep, time=time.time))
    with pytest.raises(TimeoutError, match="did not answer"):
        stack.start_stack(settings)
    assert [p.args[0] for p in started] == ["redis-server"]
    assert started[0].wait(timeout=10) is not None  # gone, not left running where no state lists it
    assert stack.stop_stack(settings) == []


def test_a_service_that_fails_to_start_takes_redis_down_with_it(settings, monkeypatch, capsys):
    started = _spy_popen(monkeypatch)
    code = stack.main(["up", "--only", "inference", "--model", "no-such-model"])
    assert code == 1 and "InferenceService exited with code 1" in capsys.readouterr().err
    assert [p.args[0] for p in started][0] == "redis-server"
    assert all(p.wait(timeout=30) is not None for p in started)
    assert stack.read_state(settings) is None


def test_status_says_when_redis_is_down(settings, capsys):
    (settings.stack_dir / "logs").mkdir(parents=True)
    url, pid = stack._start_redis(settings.stack_dir)
    stack._write_state(settings, {"redis_url": url, "processes": {"redis": {"pid": pid, "log": "redis.log"}}})
    assert stack.main(["status"]) == 0
    os.kill(pid, signal.SIGTERM)
    while stack._alive(pid):
        stack._reap(pid)
        time.sleep(0.05)
    capsys.readouterr()
    assert stack.main(["status"]) == 1
    out = capsys.readouterr().out
    assert "redis" in out and "NOT RUNNING" in out and "not running or not healthy: redis" in out
    assert stack.stop_stack(settings) == []
