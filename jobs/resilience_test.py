"""At-least-once under failure, with real worker processes and a real redis-server:
workers killed with SIGKILL mid-job, and Redis itself crashing and coming back (AOF, fsync always).

Every handler completion appends "<job id> <token>" to a per-process file (outside Redis, so a Redis
crash cannot lose or double it); the stored result carries the token, so we can see which completion
was stored, and that it was stored exactly once.
"""

import collections
import logging
import multiprocessing
import os
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from jobs.context import JobContext
from jobs.errors import QueueUnavailable
from jobs.queue import JobQueue
from jobs.testing import RedisServer
from jobs.worker import Worker
from protos import jobs_pb2

_FORK = multiprocessing.get_context("fork")


def _worker_process(url: str, log_dir: str, hang_on: Optional[int], stop, worker_options: dict) -> None:
    """A worker process whose handler records completions; with `hang_on`, its n-th job hangs (to be killed)."""
    logging.basicConfig(level=logging.ERROR)
    completions = os.open(Path(log_dir) / f"completions-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    handled = 0

    def handler(ctx: JobContext) -> dict:
        nonlocal handled
        handled += 1
        ctx.progress("working", 0.5)
        time.sleep(ctx.spec.sleep_s)
        if handled == hang_on:
            marker = Path(log_dir) / f"hung-{os.getpid()}"
            marker.with_suffix(".tmp").write_text(ctx.job.id)
            marker.with_suffix(".tmp").rename(marker)  # the test never sees it half written
            time.sleep(3600)  # mid-job, until the test kills us
        token = uuid.uuid4().hex
        os.write(completions, f"{ctx.job.id} {token}\n".encode())
        return {"token": token}

    Worker(JobQueue(url), "noop", handler, **worker_options).run_forever(stop)


def _start(url: str, log_dir: Path, stop, options: dict, hang_on: Optional[int] = None):
    process = _FORK.Process(target=_worker_process, args=(url, str(log_dir), hang_on, stop, options), daemon=True)
    process.start()
    return process


def _completions(log_dir: Path) -> dict[str, list[str]]:
    tokens: dict[str, list[str]] = collections.defaultdict(list)
    for path in log_dir.glob("completions-*.log"):
        for line in path.read_text().splitlines():
            job_id, token = line.split()
            tokens[job_id].append(token)
    return tokens


def _count_succeeded(queue: JobQueue, job_ids: list[str]) -> int:
    pipe = queue.client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(queue.keys.job(job_id), "state")
    return sum(state == b"3" for state in pipe.execute())


def _assert_each_stored_once(queue: JobQueue, job_ids: list[str], log_dir: Path) -> None:
    tokens = _completions(log_dir)
    for job_id in job_ids:
        status = queue.get(job_id)
        assert status.state == jobs_pb2.JOB_STATE_SUCCEEDED, (job_id, status)
        assert len(tokens[job_id]) == 1, f"job {job_id} ran to completion {len(tokens[job_id])} times"
        assert f'"token": "{tokens[job_id][0]}"' in status.result_json
        events = queue.client.xrange(queue.keys.events(job_id))
        assert sum(fields[b"state"] == b"3" for _, fields in events) == 1, f"job {job_id} stored more than once"
    stream = queue.keys.stream("noop")
    assert queue.client.xlen(stream) == 0
    assert queue.client.xpending(stream, "workers")["pending"] == 0
    assert queue.dead_letters("noop") == []


def _stop_all(processes: list, stop) -> None:
    stop.set()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def test_workers_killed_mid_job_again_and_again_lose_nothing(tmp_path: Path) -> None:
    kills_wanted = 6
    options = dict(visibility_timeout_s=1.0, heartbeat_s=0.2, poll_s=0.1, max_attempts=20)
    with RedisServer() as server, JobQueue(server.url) as queue:
        # 200 x 30 ms over 3 steady workers is about 2 s: time enough for every kill to land mid-run.
        job_ids = [queue.submit("noop", jobs_pb2.NoopSpec(sleep_s=0.03)) for _ in range(200)]
        stop = _FORK.Event()
        steady = [_start(server.url, tmp_path, stop, options) for _ in range(3)]
        victim = _start(server.url, tmp_path, stop, options, hang_on=1)
        killed: list[str] = []
        deadline = time.monotonic() + 50
        try:
            while _count_succeeded(queue, job_ids) < len(job_ids):
                assert time.monotonic() < deadline, f"only {_count_succeeded(queue, job_ids)} of 200 finished"
                hung = tmp_path / f"hung-{victim.pid}"
                if victim.is_alive() and hung.exists():
                    victim.kill()  # SIGKILL, mid-job
                    victim.join()
                    killed.append(hung.read_text())
                    hang_on = 1 if len(killed) < kills_wanted else None
                    victim = _start(server.url, tmp_path, stop, options, hang_on=hang_on)
                time.sleep(0.02)
        finally:
            _stop_all(steady + [victim], stop)
        assert len(killed) == kills_wanted
        _assert_each_stored_once(queue, job_ids, tmp_path)
        for job_id in killed:  # each killed job was taken over by another worker
            status = queue.get(job_id)
            assert status.job.attempt >= 2 and "stopped heartbeating" in status.error


def test_redis_crashing_and_restarting_mid_run_loses_no_job_and_runs_none_twice(tmp_path: Path) -> None:
    # The visibility timeout is longer than the outage, so no live worker's job is taken over meanwhile.
    options = dict(visibility_timeout_s=5.0, heartbeat_s=0.2, poll_s=0.1, max_attempts=5)
    with RedisServer(aof=True) as server, JobQueue(server.url) as queue:
        job_ids = [queue.submit("noop", jobs_pb2.NoopSpec(sleep_s=0.03)) for _ in range(80)]
        stop = _FORK.Event()
        workers = [_start(server.url, tmp_path, stop, options) for _ in range(3)]
        try:
            deadline = time.monotonic() + 20
            while _count_succeeded(queue, job_ids) < 15:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            server.stop(kill=True)  # a crash: SIGKILL
            time.sleep(0.5)
            server.start()
            deadline = time.monotonic() + 40
            while True:
                try:
                    if _count_succeeded(queue, job_ids) == len(job_ids):
                        break
                except QueueUnavailable:
                    pass
                assert time.monotonic() < deadline, "jobs did not all finish after the restart"
                time.sleep(0.05)
        finally:
            _stop_all(workers, stop)
        _assert_each_stored_once(queue, job_ids, tmp_path)


@pytest.mark.parametrize("kill", [False, True])
def test_an_aof_server_keeps_acknowledged_writes_across_restarts(kill: bool) -> None:
    with RedisServer(aof=True) as server, JobQueue(server.url) as queue:
        job_id = queue.submit("noop", jobs_pb2.NoopSpec(steps=4))
        port = server.port
        server.restart(kill=kill)
        assert server.port == port
        assert queue.get(job_id).job.noop.steps == 4
