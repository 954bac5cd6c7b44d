"""The caller's side against a real redis-server: submit, get, list, idempotency, cancel, watch, errors."""

import threading

import pytest
import redis

from jobs.conftest import FAST_FAIL
from jobs.errors import JobNotFound, QueueUnavailable
from jobs.kinds import parse_kind, parse_state
from jobs.queue import JobQueue
from jobs.testing import RedisServer
from protos import jobs_pb2


def test_submit_then_get_returns_the_queued_job(queue: JobQueue) -> None:
    spec = jobs_pb2.TrainSpec(preset="tiny", max_steps=7)
    job_id = queue.submit("train", spec)
    status = queue.get(job_id)
    assert status.state == jobs_pb2.JOB_STATE_QUEUED
    assert status.job.id == job_id
    assert status.job.kind == jobs_pb2.JOB_KIND_TRAIN
    assert status.job.train == spec
    assert status.job.created_unix > 0
    # The stream entry is the serialized Job, as DESIGN.md says.
    [(_, fields)] = queue.client.xrange(queue.keys.stream("train"))
    assert jobs_pb2.Job.FromString(fields[b"job"]).train.max_steps == 7


def test_kinds_accept_enum_values_and_names() -> None:
    assert parse_kind("export") == parse_kind(jobs_pb2.JOB_KIND_EXPORT) == parse_kind("JOB_KIND_EXPORT")
    assert parse_state("Failed") == jobs_pb2.JOB_STATE_FAILED
    with pytest.raises(ValueError, match="'train', 'export', 'bench', 'noop'"):
        parse_kind("deploy")
    with pytest.raises(ValueError, match="kind"):
        parse_kind(jobs_pb2.JOB_KIND_UNSPECIFIED)


def test_submit_rejects_a_bad_kind_and_a_mismatched_spec(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="allowed|one of"):
        queue.submit("sleep")
    with pytest.raises(ValueError, match="ExportSpec"):
        queue.submit("export", jobs_pb2.TrainSpec())


def test_the_same_idempotency_key_gives_one_job(queue: JobQueue) -> None:
    first = queue.submit("noop", jobs_pb2.NoopSpec(steps=1), idempotency_key="nightly-42")
    second = queue.submit("noop", jobs_pb2.NoopSpec(steps=9), idempotency_key="nightly-42")
    other = queue.submit("noop", jobs_pb2.NoopSpec(steps=1), idempotency_key="nightly-43")
    assert first == second != other
    assert queue.client.xlen(queue.keys.stream("noop")) == 2
    assert queue.get(first).job.noop.steps == 1


def test_get_of_an_unknown_job_raises_not_found(queue: JobQueue) -> None:
    with pytest.raises(JobNotFound, match="nope"):
        queue.get("nope")
    with pytest.raises(JobNotFound):
        queue.cancel("nope")
    with pytest.raises(JobNotFound):
        queue.watch("nope")


def test_list_filters_by_kind_and_state_newest_first(queue: JobQueue) -> None:
    a = queue.submit("noop")
    b = queue.submit("bench")
    c = queue.submit("noop")
    queue.cancel(c)
    assert [s.job.id for s in queue.list()] == [c, b, a]
    assert [s.job.id for s in queue.list(kind="noop")] == [c, a]
    assert [s.job.id for s in queue.list(state="cancelled")] == [c]
    assert [s.job.id for s in queue.list(kind=jobs_pb2.JOB_KIND_NOOP, state=jobs_pb2.JOB_STATE_QUEUED)] == [a]
    assert len(queue.list(limit=2)) == 2


def test_cancelling_a_queued_job_makes_it_final_and_watch_ends(queue: JobQueue) -> None:
    job_id = queue.submit("noop")
    assert queue.cancel(job_id).state == jobs_pb2.JOB_STATE_CANCELLED
    assert queue.cancel(job_id).state == jobs_pb2.JOB_STATE_CANCELLED  # a second cancel changes nothing
    events = list(queue.watch(job_id, timeout=5))
    assert [e.state for e in events] == [jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_CANCELLED]
    assert all(e.job_id == job_id and e.time_unix > 0 for e in events)


def test_watch_blocks_for_new_events_and_times_out(queue: JobQueue) -> None:
    job_id = queue.submit("noop")
    events = queue.watch(job_id, timeout=0.3)
    assert next(events).state == jobs_pb2.JOB_STATE_QUEUED
    with pytest.raises(TimeoutError, match=job_id):
        next(events)
    # An event written while a watch blocks arrives, and a final one ends the iteration.
    late = threading.Timer(0.2, queue.cancel, args=[job_id])
    late.start()
    states = [e.state for e in queue.watch(job_id, timeout=5)]
    late.join()
    assert states[-1] == jobs_pb2.JOB_STATE_CANCELLED


def test_a_lost_redis_fails_after_bounded_retries_naming_the_url(redis_server: RedisServer) -> None:
    queue = JobQueue(redis_server.url, connection=FAST_FAIL)
    job_id = queue.submit("noop")
    redis_server.stop()
    with pytest.raises(QueueUnavailable, match=redis_server.url.replace("/0", "")):
        queue.get(job_id)
    redis_server.start()  # no persistence here, so the job is gone, but the queue answers again
    with pytest.raises(JobNotFound):
        queue.get(job_id)


def test_a_short_outage_is_ridden_out_by_the_retries() -> None:
    with RedisServer(aof=True) as server:
        queue = JobQueue(server.url)  # default retries: about 3.5 s of backoff
        job_id = queue.submit("noop")
        server.stop()
        restart = threading.Timer(0.3, server.start)
        restart.start()
        assert queue.get(job_id).state == jobs_pb2.JOB_STATE_QUEUED
        restart.join()


def test_a_client_that_decodes_responses_is_refused(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        JobQueue(redis.Redis.from_url(redis_server.url, decode_responses=True))
    assert JobQueue(redis_server.client()).url == redis_server.url
