"""Queue throughput: no-op jobs per second with 1 and 4 worker processes (`python -m bench_svc.benches.jobs_queue`).

Each run submits N no-op jobs, starts K worker processes, releases them together and times until every
job is SUCCEEDED (the stream drained and nothing pending). It runs against a throwaway local
redis-server (no persistence, and with AOF fsync-always when asked) unless --redis-url is given.
Writes bench_svc/results/jobs-cpu.{csv,json,png} and prints a table.
"""

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from bench_svc.provenance import Anchor, cpu_device_name, machine_load, make_header
from bench_svc.results_io import write_results
from jobs.noop import noop_handler
from jobs.queue import JobQueue
from jobs.testing import RedisServer
from jobs.worker import Worker
from protos import jobs_pb2

__all__ = ["Measurement", "main", "measure"]

MODULE = "bench_svc.benches.jobs_queue"
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_STEM = "jobs-cpu"
_FORK = multiprocessing.get_context("fork")
_TARGET_JOBS_PER_S = 1000.0  # with 4 workers on 2 cores
_POLL_S = 0.002


@dataclass(frozen=True)
class Measurement:
    """One worker count's result over the repeats (medians, and the spread of jobs/s)."""

    persistence: str
    workers: int
    jobs: int
    repeats: int
    seconds: float
    jobs_per_s: float
    jobs_per_s_min: float
    jobs_per_s_max: float
    submit_jobs_per_s: float
    worker_cpu_us_per_job: float  # user+sys of the worker processes while draining, per job
    redis_cpu_us_per_job: float  # user+sys of redis-server while draining, per job
    load_1m: float | None  # the machine's 1-minute load average before the runs: other work competing for the cores

    @property
    def cpu_bound_jobs_per_s_on_2_cores(self) -> float:
        """What the CPU cost alone would allow on 2 idle cores (redis-server is one thread): a model, not a run."""
        total = self.worker_cpu_us_per_job + self.redis_cpu_us_per_job
        return min(2e6 / total, 1e6 / self.redis_cpu_us_per_job)


def _worker_process(url: str, prefix: str, ready, go, stop) -> None:
    queue = JobQueue(url, prefix=prefix)
    worker = Worker(queue, "noop", noop_handler)
    queue.client.ping()
    ready.wait()
    go.wait()
    worker.run_forever(stop)


@dataclass(frozen=True)
class _Run:
    seconds: float
    submit_jobs_per_s: float
    worker_cpu_s: float
    redis_cpu_s: float


def _redis_cpu_s(queue: JobQueue) -> float:
    info = queue.client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that have been waited for
    return usage.ru_utime + usage.ru_stime


def _run(url: str, workers: int, jobs: int) -> _Run:
    """Drain `jobs` no-op jobs with `workers` processes: wall time, submit rate and CPU spent."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"  # a fresh stream per run
    with JobQueue(url, prefix=prefix) as queue:
        queue.client.xgroup_create(queue.keys.stream("noop"), "workers", id="0", mkstream=True)
        spec = jobs_pb2.NoopSpec()
        start = time.perf_counter()
        job_ids = [queue.submit("noop", spec) for _ in range(jobs)]
        submit_rate = jobs / (time.perf_counter() - start)
        ready, go, stop = _FORK.Barrier(workers + 1), _FORK.Event(), _FORK.Event()
        processes = [_FORK.Process(target=_worker_process, args=(url, prefix, ready, go, stop)) for _ in range(workers)]
        for process in processes:
            process.start()
        ready.wait()
        stream = queue.keys.stream("noop")
        children_cpu, redis_cpu = _children_cpu_s(), _redis_cpu_s(queue)
        start = time.perf_counter()
        go.set()
        while queue.client.xlen(stream) or queue.client.xpending(stream, "workers")["pending"]:
            time.sleep(_POLL_S)
        seconds = time.perf_counter() - start
        redis_cpu = _redis_cpu_s(queue) - redis_cpu
        stop.set()
        for process in processes:
            process.join()
        children_cpu = _children_cpu_s() - children_cpu
        pipe = queue.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(queue.keys.job(job_id), "state")
        done = sum(state == b"%d" % jobs_pb2.JOB_STATE_SUCCEEDED for state in pipe.execute())
        if done != jobs:
            raise RuntimeError(f"only {done} of {jobs} jobs succeeded")
        queue.client.delete(*(queue.keys.job(j) for j in job_ids), *(queue.keys.events(j) for j in job_ids))
        return _Run(seconds, submit_rate, children_cpu, redis_cpu)


def measure(url: str, persistence: str, workers: int, jobs: int, repeats: int) -> Measurement:
    """Median throughput of `repeats` runs of `jobs` no-op jobs drained by `workers` processes."""
    load = machine_load()
    runs = [_run(url, workers, jobs) for _ in range(repeats)]
    rates = [jobs / run.seconds for run in runs]
    return Measurement(
        persistence=persistence,
        workers=workers,
        jobs=jobs,
        repeats=repeats,
        seconds=statistics.median(run.seconds for run in runs),
        jobs_per_s=statistics.median(rates),
        jobs_per_s_min=min(rates),
        jobs_per_s_max=max(rates),
        submit_jobs_per_s=statistics.median(run.submit_jobs_per_s for run in runs),
        worker_cpu_us_per_job=1e6 * statistics.median(run.worker_cpu_s for run in runs) / jobs,
        redis_cpu_us_per_job=1e6 * statistics.median(run.redis_cpu_s for run in runs) / jobs,
        load_1m=load,
    )


def _write(results: list[Measurement], meta: dict, command: list[str], out_dir: Path) -> list[Path]:
    """jobs-cpu.{csv,json} through the harness's writer (device, commit, command, time, load in the header), and the
    bar chart beside them."""
    header = make_header(
        cpu_device_name(), REPO_ROOT, command, Anchor("target with 4 workers on 2 cores", _TARGET_JOBS_PER_S, "jobs/s")
    )
    summary = {f"jobs_per_s_{m.workers}w_{m.persistence.replace(' ', '_')}": round(m.jobs_per_s, 1) for m in results}
    rows = [{**meta, **_row(m)} for m in results]
    paths = write_results(out_dir, "jobs", header, rows, summary=summary, stem=RESULT_STEM)
    png = out_dir / f"{RESULT_STEM}.png"
    _plot(results, meta, png)
    return [*paths, png]


def _plot(results: list[Measurement], meta: dict, path: Path) -> None:
    """Bars of median jobs/s (min-max whiskers) per setup, with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{m.workers} worker{'s' if m.workers > 1 else ''}\n{m.persistence}" for m in results]
    values = [m.jobs_per_s for m in results]
    errors = [[m.jobs_per_s - m.jobs_per_s_min for m in results], [m.jobs_per_s_max - m.jobs_per_s for m in results]]
    ax.bar(labels, values, yerr=errors, capsize=4, color="#4878a8")
    ax.axhline(_TARGET_JOBS_PER_S, color="#c44e52", linestyle="--", label="target (4 workers, 2 cores)")
    top = max(m.jobs_per_s_max for m in results)
    for x, m in enumerate(results):  # above the whisker
        ax.text(x, m.jobs_per_s_max + 0.02 * top, f"{m.jobs_per_s:,.0f}", ha="center", va="bottom")
    ax.set_ylim(0, 1.2 * top)
    ax.set_ylabel("no-op jobs / s (median, min-max)")
    loads = ", ".join("?" if m.load_1m is None else f"{m.load_1m:.1f}" for m in results)
    ax.set_title(f"tinylm job queue: {meta['nproc']} CPU cores, redis {meta['redis_version']}\nload average {loads}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row(m: Measurement) -> dict:
    return {**asdict(m), "cpu_bound_jobs_per_s_on_2_cores": round(m.cpu_bound_jobs_per_s_on_2_cores, 1)}


def _print_table(results: list[Measurement]) -> None:
    print(
        f"{'redis':<17} {'workers':>7} {'jobs':>5} {'jobs/s':>7} {'min':>6} {'max':>6} {'submit/s':>8} "
        f"{'worker us/job':>13} {'redis us/job':>12} {'load':>5} {'cpu-bound 2 cores':>17}"
    )
    for m in results:
        print(
            f"{m.persistence:<17} {m.workers:>7} {m.jobs:>5} {m.jobs_per_s:>7,.0f} {m.jobs_per_s_min:>6,.0f} "
            f"{m.jobs_per_s_max:>6,.0f} {m.submit_jobs_per_s:>8,.0f} {m.worker_cpu_us_per_job:>13,.0f} "
            f"{m.redis_cpu_us_per_job:>12,.0f} {m.load_1m or 0.0:>5.1f} {m.cpu_bound_jobs_per_s_on_2_cores:>17,.0f}"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000, help="no-op jobs per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="worker process counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--aof", action="store_true", help="also measure a server with AOF, appendfsync always")
    parser.add_argument("--redis-url", default=None, help="measure this Redis instead of a throwaway local one")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_svc" / "results")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.repeats < 1 or min(args.workers) < 1:
        parser.error("--jobs, --repeats and --workers must be >= 1")
    command = [sys.executable, "-m", MODULE, *(sys.argv[1:] if argv is None else argv)]
    results: list[Measurement] = []
    redis_version = "?"
    setups = [("given", args.redis_url)] if args.redis_url else [("no persistence", None)]
    if args.aof and not args.redis_url:
        setups.append(("aof fsync always", None))
    for persistence, url in setups:
        server = None if url else RedisServer(aof=persistence != "no persistence").start()
        try:
            url = url or server.url
            redis_version = JobQueue(url).client.info("server")["redis_version"]
            for workers in args.workers:
                results.append(measure(url, persistence, workers, args.jobs, args.repeats))
                _print_table(results[-1:])
        finally:
            if server is not None:
                server.close()
    meta = {"nproc": os.cpu_count(), "redis_version": redis_version, "python": platform.python_version()}
    paths = _write(results, meta, command, args.out)
    print()
    _print_table(results)
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
