"""Prometheus metrics of the job queue, for the services whose workers consume it (trainer, exporter, bench).

Queue state is read from Redis at scrape time, so every replica reports the same figures for the whole queue:
jobs waiting per kind (in the stream and not yet delivered, plus retries waiting out their backoff), jobs running
(delivered, not yet acked), dead letters. Job durations are this process's own: each worker's `on_finished`
observes an attempt's wall time by kind and outcome. `serve_metrics` exposes a registry on prometheus_client's
own HTTP server (GET /metrics), beside the service's gRPC port.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import redis
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.kinds import KIND_NAMES
from jobs.queue import JobQueue

__all__ = ["JobMetrics", "MetricsServer", "serve_metrics"]

PREFIX = "tinylm"
# Seconds: a noop job takes milliseconds, a training run hours.
_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)


class _QueueState(Collector):
    """Gauges read from Redis at each scrape (a few commands per kind, pipelined)."""

    def __init__(self, queue: JobQueue, kinds: Sequence[str], group: str) -> None:
        self._queue = queue
        self._kinds = tuple(kinds)
        self._group = group

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            f"{PREFIX}_jobs_queued", "Jobs waiting for a worker (incl. retries in backoff).", labels=["kind"]
        )
        running = GaugeMetricFamily(
            f"{PREFIX}_jobs_running", "Jobs a worker has claimed and not yet finished.", labels=["kind"]
        )
        dead = GaugeMetricFamily(f"{PREFIX}_jobs_dead_letters", "Entries in the dead-letter stream.", labels=["kind"])
        keys = self._queue.keys
        for kind in self._kinds:
            pipe = self._queue.client.pipeline(transaction=False)
            pipe.xlen(keys.stream(kind))
            pipe.zcard(keys.delayed(kind))
            pipe.xlen(keys.dead(kind))
            in_stream, delayed, n_dead = pipe.execute()
            pending = self._pending(keys.stream(kind))
            queued.add_metric([kind], in_stream - pending + delayed)  # finished entries are deleted from the stream
            running.add_metric([kind], pending)
            dead.add_metric([kind], n_dead)
        yield from (queued, running, dead)

    def _pending(self, stream: str) -> int:
        try:
            return int(self._queue.client.xpending(stream, self._group)["pending"])
        except redis.ResponseError:  # no stream or no consumer group yet: nothing was ever claimed
            return 0


class JobMetrics:
    """The job metrics of one service process, in a registry of its own (no global state)."""

    def __init__(self, queue: JobQueue, kinds: Sequence[str] = (), *, group: str = "workers") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        kinds = tuple(kinds) or tuple(k for k in KIND_NAMES.values() if k != "noop")
        self.registry.register(_QueueState(queue, kinds, group))
        self.duration = Histogram(
            f"{PREFIX}_job_duration_seconds",
            "Wall time of a job attempt in this process, by kind and outcome.",
            ["kind", "outcome"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )

    def observe(self, kind: str, outcome: str, seconds: float) -> None:
        """A `Worker(on_finished=...)` callback."""
        self.duration.labels(kind, outcome).observe(seconds)


@dataclass
class MetricsServer:
    """prometheus_client's HTTP server for one registry; `stop()` shuts it down."""

    url: str  # http://host:port/metrics
    _server: object
    _thread: object

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serves `registry` on http://host:port/metrics (loopback by default; port 0 picks a free one)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    shown = f"[{host}]" if ":" in host else host
    return MetricsServer(url=f"http://{shown}:{server.server_port}/metrics", _server=server, _thread=thread)
