"""The jobs CLI against a real redis-server: list, show, watch, cancel, retry-dead, --json, exit codes."""

import json

import pytest

from jobs.cli import main
from jobs.noop import noop_handler
from jobs.queue import JobQueue
from jobs.testing import RedisServer
from jobs.worker import Worker
from protos import jobs_pb2


def _run(capsys: pytest.CaptureFixture, *argv: str, url: str = "") -> tuple[int, str, str]:
    code = main(list(argv), default_redis_url=url or None)
    out, err = capsys.readouterr()
    return code, out, err


def test_list_and_show_print_jobs_and_parse_as_json(queue: JobQueue, capsys: pytest.CaptureFixture) -> None:
    url = queue.url
    first = queue.submit("train", jobs_pb2.TrainSpec(preset="tiny"))
    second = queue.submit("noop")
    code, out, _ = _run(capsys, "list", url=url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "STATE", "ATTEMPT", "UPDATED", "ERROR"]
    assert lines[1].startswith(second) and lines[2].startswith(first) and "queued" in lines[2]

    code, out, _ = _run(capsys, "list", "--kind", "train", "--json", "--redis-url", url)
    [listed] = json.loads(out)
    assert code == 0 and listed["job"]["id"] == first and listed["kind"] == "train" and listed["state"] == "queued"

    code, out, _ = _run(capsys, "show", first, "--json", url=url)
    shown = json.loads(out)
    assert code == 0 and shown["job"]["train"]["preset"] == "tiny" and shown["result"] is None
    code, out, _ = _run(capsys, "show", first, url=url)
    assert code == 0 and "state: queued" in out and '"preset": "tiny"' in out


def test_cancel_then_watch_a_cancelled_job_fails(queue: JobQueue, capsys: pytest.CaptureFixture) -> None:
    job_id = queue.submit("noop")
    code, out, _ = _run(capsys, "cancel", job_id, "--json", url=queue.url)
    assert code == 0 and json.loads(out)["state"] == "cancelled"
    assert queue.get(job_id).state == jobs_pb2.JOB_STATE_CANCELLED
    code, out, _ = _run(capsys, "watch", job_id, "--json", url=queue.url)
    assert code == 1  # it did not succeed
    assert [json.loads(line)["state"] for line in out.splitlines()] == ["JOB_STATE_QUEUED", "JOB_STATE_CANCELLED"]


def test_watch_of_a_succeeding_job_exits_zero(queue: JobQueue, capsys: pytest.CaptureFixture) -> None:
    job_id = queue.submit("noop", jobs_pb2.NoopSpec(steps=2))
    worker = Worker(queue, "noop", noop_handler, "w1", poll_s=0.05)
    worker.run_once()
    worker.close()
    code, out, _ = _run(capsys, "watch", job_id, url=queue.url)
    assert code == 0
    assert "step 2/2" in out and "100.0%" in out and out.splitlines()[-1].split()[2] == "succeeded"


def test_retry_dead_and_dead_letters(queue: JobQueue, capsys: pytest.CaptureFixture) -> None:
    job_id = queue.submit("noop", jobs_pb2.NoopSpec(fail_message="nope", fail_attempts=1))
    worker = Worker(queue, "noop", noop_handler, "w1", max_attempts=1, poll_s=0.05)
    worker.run_once()
    worker.close()
    code, out, _ = _run(capsys, "dead-letters", "noop", "--json", url=queue.url)
    [letter] = json.loads(out)
    assert code == 0 and letter["job_id"] == job_id and letter["error"] == "RuntimeError: nope"
    code, out, _ = _run(capsys, "retry-dead", "noop", "--json", url=queue.url)
    assert code == 0 and json.loads(out) == {"requeued": [job_id]}
    assert queue.get(job_id).state == jobs_pb2.JOB_STATE_QUEUED


def test_exit_codes_for_not_found_usage_and_no_redis(queue: JobQueue, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "show", "missing", url=queue.url)
    assert code == 1 and "missing" in err
    assert _run(capsys, "cancel", "missing", url=queue.url)[0] == 1
    assert _run(capsys, "frobnicate", url=queue.url)[0] == 2
    assert _run(capsys, "list", "--state", "sleeping", url=queue.url)[0] == 2
    assert _run(capsys, "list", "--limit", "0", url=queue.url)[0] == 2
    code, _, err = _run(capsys, "list")
    assert code == 2 and "TINYLM_REDIS_URL" in err


def test_an_unreachable_redis_exits_one_naming_the_url(capsys: pytest.CaptureFixture) -> None:
    with RedisServer() as server:
        url = server.url
    code, _, err = _run(capsys, "list", url=url)
    assert code == 1 and url in err
