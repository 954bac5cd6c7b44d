"""Job-queue metrics against a real redis-server, scraped over HTTP and parsed with prometheus_client's parser:
queued, running and dead-lettered jobs per kind, and attempt durations counted exactly once each."""

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from jobs.context import JobContext
from jobs.metrics import JobMetrics, serve_metrics
from jobs.noop import noop_handler
from jobs.queue import JobQueue
from jobs.worker import Worker
from protos import jobs_pb2

FAST = dict(poll_s=0.05, backoff_base_s=0.01, backoff_max_s=0.02, visibility_timeout_s=5.0)


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_queue_gauges_and_job_durations(queue: JobQueue) -> None:
    metrics = JobMetrics(queue, kinds=("noop",))
    server = serve_metrics(metrics.registry)
    noop = (("kind", "noop"),)
    try:
        assert _scrape(server.url)[("tinylm_jobs_queued", noop)] == 0  # no stream, no group yet
        release = threading.Event()

        def blocking(ctx: JobContext):
            release.wait(10)
            return noop_handler(ctx)

        ids = [queue.submit("noop", jobs_pb2.NoopSpec(steps=1)) for _ in range(3)]
        worker = Worker(queue, "noop", blocking, "w1", on_finished=metrics.observe, **FAST)
        runner = threading.Thread(target=worker.run_once)
        runner.start()
        deadline = time.monotonic() + 10
        while queue.get(ids[0]).state != jobs_pb2.JOB_STATE_RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        seen = _scrape(server.url)
        assert (seen[("tinylm_jobs_queued", noop)], seen[("tinylm_jobs_running", noop)]) == (2, 1)
        release.set()
        runner.join()

        failing = queue.submit("noop", jobs_pb2.NoopSpec(fail_message="disk on fire", fail_attempts=5))
        doomed = Worker(queue, "noop", noop_handler, "w2", on_finished=metrics.observe, max_attempts=2, **FAST)
        while (
            queue.get(failing).state != jobs_pb2.JOB_STATE_FAILED
            or queue.get(ids[2]).state != jobs_pb2.JOB_STATE_SUCCEEDED
        ):
            assert time.monotonic() < deadline + 20
            doomed.run_once()
        worker.close()
        doomed.close()
        seen = _scrape(server.url)
        assert (seen[("tinylm_jobs_queued", noop)], seen[("tinylm_jobs_running", noop)]) == (0, 0)
        assert seen[("tinylm_jobs_dead_letters", noop)] == 1
        count = lambda outcome: seen[("tinylm_job_duration_seconds_count", (("kind", "noop"), ("outcome", outcome)))]  # noqa: E731
        assert (count("succeeded"), count("failed")) == (3, 2)
    finally:
        server.stop()
