"""The worker against a real redis-server, in one process: retries, dead letters, garbage entries,
cancellation, progress events, reclaiming a dead worker's job, and pipelines."""

import threading
import time
from collections.abc import Callable

import pytest

from jobs.context import JobContext, JobResult
from jobs.errors import JobCancelled, PermanentJobError
from jobs.noop import noop_handler
from jobs.queue import JobQueue
from jobs.worker import Worker, WorkerConfig
from protos import jobs_pb2

FAST = dict(poll_s=0.05, backoff_base_s=0.05, backoff_max_s=0.2, visibility_timeout_s=5.0)


class _Crash(BaseException):
    """Stands in for the process dying mid-job: the worker does not catch it, so nothing is stored or acked."""


def _run_until(worker: Worker, done: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        worker.run_once()


def _final(queue: JobQueue, job_id: str) -> Callable[[], bool]:
    return lambda: queue.get(job_id).state >= jobs_pb2.JOB_STATE_SUCCEEDED


def _stream_is_empty(queue: JobQueue, kind: str = "noop") -> bool:
    stream = queue.keys.stream(kind)
    return queue.client.xlen(stream) == 0 and queue.client.xpending(stream, "workers")["pending"] == 0


def test_a_job_runs_and_watch_yields_its_progress_then_ends(queue: JobQueue) -> None:
    job_id = queue.submit("noop", jobs_pb2.NoopSpec(steps=3))
    worker = Worker(queue, "noop", noop_handler, "w1", **FAST)
    runner = threading.Thread(target=_run_until, args=(worker, _final(queue, job_id)))
    runner.start()
    events = list(queue.watch(job_id, timeout=15))
    runner.join()
    worker.close()
    assert [e.state for e in events] == [1, 2, 2, 2, 2, 3]
    assert [e.message for e in events[2:5]] == ["step 1/3", "step 2/3", "step 3/3"]
    assert [e.progress for e in events[2:5]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert events[4].metrics["step"] == 3.0 and events[4].attempt == 1
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_SUCCEEDED and status.worker == ""
    assert '"steps": 3' in status.result_json
    assert _stream_is_empty(queue)


def test_a_failing_handler_retries_then_dead_letters_and_retry_dead_requeues(queue: JobQueue) -> None:
    spec = jobs_pb2.NoopSpec(fail_message="disk on fire", fail_attempts=2)
    job_id = queue.submit("noop", spec)
    worker = Worker(queue, "noop", noop_handler, "w1", max_attempts=2, **FAST)
    _run_until(worker, _final(queue, job_id))
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_FAILED
    assert status.job.attempt == 2
    assert status.error == "RuntimeError: disk on fire"
    [letter] = queue.dead_letters("noop")
    assert (letter.job_id, letter.attempt, letter.error) == (job_id, 2, "RuntimeError: disk on fire")
    assert letter.job is not None and letter.job.noop == spec
    messages = [e.message for e in queue.watch(job_id, timeout=1)]
    assert any(m.startswith("attempt 1 failed: RuntimeError: disk on fire; retrying in 0.05") for m in messages)

    assert queue.retry_dead("noop") == [job_id]
    assert queue.dead_letters("noop") == []
    assert queue.get(job_id).state == jobs_pb2.JOB_STATE_QUEUED
    _run_until(worker, _final(queue, job_id))
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert status.job.attempt == 3  # attempts keep counting; the requeue gave a fresh budget of 2
    assert _stream_is_empty(queue)
    worker.close()


def test_retry_dead_of_one_job_leaves_the_others(queue: JobQueue) -> None:
    spec = jobs_pb2.NoopSpec(fail_message="no", fail_attempts=9)
    first, second = queue.submit("noop", spec), queue.submit("noop", spec)
    worker = Worker(queue, "noop", noop_handler, "w1", max_attempts=1, **FAST)
    _run_until(worker, lambda: len(queue.dead_letters("noop")) == 2)
    assert queue.retry_dead("noop", job_id=second) == [second]
    assert [d.job_id for d in queue.dead_letters("noop")] == [first]
    worker.close()


def _mangle(queue: JobQueue, job_id: str, job_bytes: bytes) -> None:
    """Replace a queued job's stream entry with one carrying `job_bytes` (as a buggy producer might)."""
    stream = queue.keys.stream("noop")
    entry_id = queue.client.hget(queue.keys.job(job_id), "entry")
    queue.client.xdel(stream, entry_id)
    queue.client.hset(queue.keys.job(job_id), "entry", queue.client.xadd(stream, {"id": job_id, "job": job_bytes}))


def test_garbage_stream_entries_are_dead_lettered_and_the_worker_carries_on(queue: JobQueue) -> None:
    stream = queue.keys.stream("noop")
    queue.client.xadd(stream, {"junk": "x"})
    queue.client.xadd(stream, {"id": "abc", "job": b"\xff\xfe not a protobuf"})
    unparseable, wrong_kind = queue.submit("noop"), queue.submit("noop")
    _mangle(queue, unparseable, b"\xff\xfe")
    _mangle(queue, wrong_kind, jobs_pb2.Job(id=wrong_kind, kind=jobs_pb2.JOB_KIND_TRAIN).SerializeToString())
    good = queue.submit("noop")
    worker = Worker(queue, "noop", noop_handler, "w1", **FAST)
    _run_until(worker, _final(queue, good))
    assert queue.get(good).state == jobs_pb2.JOB_STATE_SUCCEEDED
    letters = queue.dead_letters("noop")
    assert len(letters) == 4
    assert "no 'job' field" in letters[0].error and letters[0].raw == {"junk": b"x"}
    assert "no status hash for job abc" in letters[1].error
    assert letters[1].raw["job"] == b"\xff\xfe not a protobuf"
    # Submitted jobs whose entries were mangled fail with the reason, rather than vanish or loop.
    assert (letters[2].job_id, letters[3].job_id) == (unparseable, wrong_kind)
    assert "cannot parse" in letters[2].error and "cannot parse" in queue.get(unparseable).error
    assert "does not belong" in letters[3].error
    assert queue.get(wrong_kind).state == jobs_pb2.JOB_STATE_FAILED
    assert queue.retry_dead("noop", job_id=good) == []  # not a dead letter
    assert _stream_is_empty(queue)
    worker.close()


def test_a_cancelled_queued_job_never_runs(queue: JobQueue) -> None:
    ran: list[str] = []
    job_id = queue.submit("noop")
    later = queue.submit("noop")
    queue.cancel(job_id)
    worker = Worker(queue, "noop", lambda ctx: ran.append(ctx.job.id) or {}, "w1", **FAST)
    _run_until(worker, _final(queue, later))
    assert ran == [later]
    assert queue.get(job_id).state == jobs_pb2.JOB_STATE_CANCELLED
    assert _stream_is_empty(queue)
    worker.close()


def test_a_job_cancelled_during_its_retry_backoff_never_runs_again(queue: JobQueue) -> None:
    job_id = queue.submit("noop", jobs_pb2.NoopSpec(fail_message="flaky", fail_attempts=1))
    worker = Worker(queue, "noop", noop_handler, "w1", **{**FAST, "backoff_base_s": 0.3, "backoff_max_s": 1.0})
    worker.run_once()
    assert queue.get(job_id).state == jobs_pb2.JOB_STATE_QUEUED  # waiting out its backoff
    assert queue.client.zcard(queue.keys.delayed("noop")) == 1
    assert queue.cancel(job_id).state == jobs_pb2.JOB_STATE_CANCELLED
    assert queue.client.zcard(queue.keys.delayed("noop")) == 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # well past the backoff
        worker.run_once()
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_CANCELLED and status.job.attempt == 1
    assert _stream_is_empty(queue)
    worker.close()


def test_a_cancelled_running_job_stops_at_its_next_check(queue: JobQueue) -> None:
    job_id = queue.submit("noop", jobs_pb2.NoopSpec(steps=500, sleep_s=0.01))
    worker = Worker(queue, "noop", noop_handler, "w1", heartbeat_s=0.05, **FAST)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_forever, args=(stop,))
    runner.start()
    events = queue.watch(job_id, timeout=15)
    while next(events).message != "step 3/500":
        pass
    assert queue.cancel(job_id).state == jobs_pb2.JOB_STATE_RUNNING  # told, not yet stopped
    rest = list(events)
    assert rest[-1].state == jobs_pb2.JOB_STATE_CANCELLED
    assert "was cancelled" in rest[-1].message
    assert len(rest) < 100  # it stopped long before step 500
    follow_up = queue.submit("noop")  # and the worker goes on to the next job
    assert list(queue.watch(follow_up, timeout=15))[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    stop.set()
    runner.join()
    assert _stream_is_empty(queue)


def test_a_dead_workers_job_is_reclaimed_after_the_visibility_timeout(queue: JobQueue) -> None:
    def crash(ctx: JobContext) -> dict:
        raise _Crash()

    job_id = queue.submit("noop", jobs_pb2.NoopSpec(steps=1))
    ghost = Worker(queue, "noop", crash, "ghost", **FAST)
    with pytest.raises(_Crash):
        ghost.run_once()
    ghost.close()
    assert queue.get(job_id).state == jobs_pb2.JOB_STATE_RUNNING
    assert queue.get(job_id).worker == "ghost"
    rescuer = Worker(queue, "noop", noop_handler, "rescuer", **{**FAST, "visibility_timeout_s": 0.3})
    _run_until(rescuer, _final(queue, job_id))
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_SUCCEEDED and status.job.attempt == 2
    assert "worker ghost stopped heartbeating" in status.error
    assert _stream_is_empty(queue)
    rescuer.close()


def test_a_worker_used_again_after_close_still_heartbeats(queue: JobQueue) -> None:
    config = {**FAST, "visibility_timeout_s": 0.4}
    reused = Worker(queue, "noop", noop_handler, "reused", **config)
    reused.close()
    job_id = queue.submit("noop", jobs_pb2.NoopSpec(steps=8, sleep_s=0.1))  # 0.8 s: twice the visibility timeout
    runner = threading.Thread(target=reused.run_once)
    runner.start()
    thief = Worker(queue, "noop", noop_handler, "thief", **config)  # takes over whatever stops beating
    _run_until(thief, _final(queue, job_id))
    runner.join()
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert status.job.attempt == 1 and status.error == ""  # never taken over
    reused.close()
    thief.close()


def test_a_job_whose_workers_keep_dying_is_dead_lettered(queue: JobQueue) -> None:
    def crash(ctx: JobContext) -> dict:
        raise _Crash()

    job_id = queue.submit("noop")
    config = {**FAST, "visibility_timeout_s": 0.2, "max_attempts": 2}
    ghost = Worker(queue, "noop", crash, "ghost", **config)
    deadline = time.monotonic() + 15
    while queue.get(job_id).state != jobs_pb2.JOB_STATE_FAILED:
        assert time.monotonic() < deadline
        try:
            ghost.run_once()
        except _Crash:
            pass
    ghost.close()
    [letter] = queue.dead_letters("noop")
    assert letter.job_id == job_id and letter.attempt == 2
    assert "stopped heartbeating" in letter.error
    assert _stream_is_empty(queue)


def test_a_slow_duplicate_cannot_store_twice_and_pipelines_enqueue_the_child_once(queue: JobQueue) -> None:
    release_slow = threading.Event()

    def parent_handler(ctx: JobContext) -> JobResult:
        if ctx.job.parent_id:
            return JobResult({"child": True})
        if ctx.worker == "slow":
            release_slow.wait(15)
        return JobResult({"by": ctx.worker}, next_jobs=[("noop", jobs_pb2.NoopSpec(steps=2))])

    parent = queue.submit("noop")
    # "slow" holds the job and beats once a second; "fast" reclaims anything idle for 0.2 s, so it takes
    # the job over between two of slow's beats, while slow is still alive.
    slow = Worker(queue, "noop", parent_handler, "slow", **{**FAST, "visibility_timeout_s": 30.0})
    fast = Worker(queue, "noop", parent_handler, "fast", **{**FAST, "visibility_timeout_s": 0.2})
    slow_runner = threading.Thread(target=slow.run_once)
    slow_runner.start()
    deadline = time.monotonic() + 30
    while queue.get(parent).worker != "slow":  # slow must hold the job before fast may take it over
        assert time.monotonic() < deadline, "slow never claimed the job"
        time.sleep(0.01)
    _run_until(fast, lambda: queue.get(parent).state == jobs_pb2.JOB_STATE_SUCCEEDED)
    release_slow.set()
    slow_runner.join()
    status = queue.get(parent)
    assert status.result_json == '{"by": "fast"}' and status.job.attempt == 2
    [child] = status.child_ids
    _run_until(fast, _final(queue, child))
    children = [s for s in queue.list(kind="noop") if s.job.parent_id == parent]
    assert [s.job.id for s in children] == [child]  # slow's late success enqueued no second child
    assert queue.get(child).state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert queue.get(parent).result_json == '{"by": "fast"}'  # and did not overwrite the result
    succeeded = [e for e in queue.watch(parent, timeout=1) if e.state == jobs_pb2.JOB_STATE_SUCCEEDED]
    assert len(succeeded) == 1
    assert _stream_is_empty(queue)
    slow.close()
    fast.close()


def test_a_result_that_is_not_json_fails_the_attempt(queue: JobQueue) -> None:
    job_id = queue.submit("noop")
    worker = Worker(queue, "noop", lambda ctx: {"x": object()}, "w1", max_attempts=1, **FAST)
    _run_until(worker, _final(queue, job_id))
    assert queue.get(job_id).state == jobs_pb2.JOB_STATE_FAILED
    assert "TypeError" in queue.get(job_id).error
    worker.close()


def test_job_context_checks_its_arguments_and_flags() -> None:
    sent: list[tuple] = []
    cancel, lost = threading.Event(), threading.Event()
    job = jobs_pb2.Job(id="j", kind=jobs_pb2.JOB_KIND_NOOP, attempt=2, noop=jobs_pb2.NoopSpec(steps=4))
    ctx = JobContext(job, "w", lambda *args: sent.append(args), cancel, lost)
    ctx.progress("half", 0.5, loss=1.5)
    ctx.progress("unknown")
    assert sent == [("half", 0.5, {"loss": 1.5}), ("unknown", -1.0, {})]
    assert ctx.spec.steps == 4 and ctx.attempt == 2
    with pytest.raises(ValueError, match="fraction"):
        ctx.progress("x", 1.5)
    with pytest.raises(ValueError, match="loss"):
        ctx.progress("x", 0.1, loss=float("nan"))
    ctx.check_cancelled()
    lost.set()
    with pytest.raises(JobCancelled, match="lost its lease"):
        ctx.check_cancelled()
    with pytest.raises(ValueError, match="max_attempts"):
        WorkerConfig(max_attempts=0)
    with pytest.raises(ValueError, match="ExportSpec"):
        JobResult({}, next_jobs=[("export", jobs_pb2.NoopSpec())])


def test_a_permanent_error_fails_the_job_at_once_without_retries(queue: JobQueue) -> None:
    def handler(ctx: JobContext) -> None:
        calls.append(ctx.attempt)
        raise PermanentJobError("corpus /nope does not exist")

    calls: list[int] = []
    job_id = queue.submit("noop", jobs_pb2.NoopSpec())
    worker = Worker(queue, "noop", handler, "w1", max_attempts=3, **FAST)
    _run_until(worker, _final(queue, job_id))
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_FAILED and calls == [1]
    assert status.error == "PermanentJobError: corpus /nope does not exist"
    [letter] = queue.dead_letters("noop")
    assert (letter.job_id, letter.attempt) == (job_id, 1)
    worker.close()
