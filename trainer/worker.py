"""The train-queue consumer: runs each train job with `trainer.train.train`, streaming progress as job events.

A job's run folder is `<runs>/<job id>`, and every attempt resumes from the resume state there, so a job
reclaimed from a dead worker (at-least-once delivery) continues where the last checkpoint left it. A cancel
stops training at the next step (the run folder keeps the best checkpoint and the resume state). On success
the result is {model_id, metrics, run_dir, steps, stopped}; a spec with `then_export` enqueues the export
job with the new model filled in, through the queue's pipeline mechanism (JobResult.next_jobs).

Start-up: `run_workers` starts importing torch's compiler in the background as the worker starts, so the first
job finds it imported; a job with the same compiled shape as the one before reuses its compiled code
(trainer.warm_start.before_run, which train() calls for every run in the process). Each job's result and first progress event carry its start-up timings, counted
from the job's dequeue (`startup_s`: dequeued -> first step).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.context import JobContext, JobResult
from jobs.errors import JobCancelled, PermanentJobError
from jobs.queue import JobQueue
from jobs.worker import Handler, Worker
from protos import jobs_pb2
from trainer.corpus import CorpusError, resolve_corpus
from trainer.spec import config_from_spec
from trainer.train import train
from trainer.warm_start import preload_compiler, preload_cuda

__all__ = ["TrainerPaths", "make_train_handler", "make_worker", "run_workers", "progress_message"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerPaths:
    """Where the trainer keeps things under one home folder, and the corpus used when a spec names none."""

    home: Path
    default_corpus: str | None = None  # None: Tiny Shakespeare, downloaded once into data/

    @property
    def store_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def data(self) -> Path:
        return self.home / "data"


def progress_message(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    """The human line of a progress event: "step 120/2000 loss 1.9200 | grad norm 0.412 | val 1.95 | 52,000 tok/s"."""
    text = f"step {step}/{max_steps}"
    if "loss" in metrics:
        text += f" loss {metrics['loss']:.4f}"
    if "grad_norm" in metrics:
        text += f" | grad norm {metrics['grad_norm']:.3g}"
    if "val_loss" in metrics:
        text += f" | val {metrics['val_loss']:.4f} (best {metrics.get('best_val_loss', metrics['val_loss']):.4f})"
    if "tokens_per_s" in metrics:
        text += f" | {metrics['tokens_per_s']:,.0f} tok/s"
    if "mfu" in metrics:
        text += f" | MFU {100 * metrics['mfu']:.1f}%"
    return text


def make_train_handler(paths: TrainerPaths) -> Handler:
    """The handler a `jobs.worker.Worker` calls for each train job."""

    def handle(ctx: JobContext) -> JobResult:
        dequeued = time.perf_counter()
        spec: jobs_pb2.TrainSpec = ctx.job.train
        run_dir = paths.runs / ctx.job.id
        config = config_from_spec(spec).replace(log_dir=str(run_dir), resume=True)
        try:
            corpus = resolve_corpus(spec.corpus_path or paths.default_corpus, paths.data)
        except CorpusError as err:  # missing, unreadable or unreachable: a retry would fail the same way
            raise PermanentJobError(str(err)) from err
        ctx.progress(f"training {config.model_name} ({config.preset}) for {config.max_steps} steps", 0.0)

        def on_progress(step: int, metrics: dict[str, float]) -> None:
            finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
            ctx.progress(progress_message(step, config.max_steps, finite), step / config.max_steps, **finite)

        result = train(
            config,
            corpus,
            started_at=dequeued,
            store_root=paths.store_root,
            run_dir=run_dir,
            data_dir=paths.data,
            progress_callback=on_progress,
            should_stop=ctx.cancelled,
        )
        if result.stopped == "cancelled":
            ctx.check_cancelled()  # raises with the reason (cancelled, or the lease moved to another worker)
            raise JobCancelled(f"job {ctx.job.id} stopped at step {result.steps}")
        if result.model_id is None:
            raise RuntimeError(f"training stopped ({result.stopped}) at step {result.steps} without a checkpoint")
        out = {
            "model_id": result.model_id,
            "metrics": result.metrics,
            "run_dir": str(run_dir),
            "steps": result.steps,
            "stopped": result.stopped,
            "compiled_code_reused": result.compiled_code_reused,
        }
        log.info("job %s: first step %.2f s after dequeue (compiled code of the previous job %s)", ctx.job.id,
                 result.metrics.get("startup_s", math.nan), "reused" if result.compiled_code_reused else "not reused")  # fmt: skip
        next_jobs = []
        if spec.HasField("then_export"):
            export = jobs_pb2.ExportSpec()
            export.CopyFrom(spec.then_export)
            export.model_id = result.model_id
            next_jobs.append(("export", export))
        ctx.progress(f"done: model {result.model_id} (val loss {result.metrics.get('val_loss', math.nan):.4f})", 1.0)
        return JobResult(result=out, next_jobs=next_jobs)

    return handle


def make_worker(queue: JobQueue, paths: TrainerPaths, consumer_name: str = "", **worker_options: object) -> Worker:
    """A Worker on the train stream running `make_train_handler(paths)`; options go to jobs.worker.Worker."""
    return Worker(queue, "train", make_train_handler(paths), consumer_name, **worker_options)


def run_workers(
    queue: JobQueue, paths: TrainerPaths, n: int, stop: threading.Event, **worker_options: object
) -> list[threading.Thread]:
    """Start `n` worker threads that run until `stop` is set.

    Training uses the process-wide torch RNG, so one worker per process keeps runs exactly reproducible;
    scale out with more processes (or machines) rather than more threads.
    """
    if n > 0:
        preload_cuda()  # the first job then finds CUDA's driver up and torch's compiler imported (trainer.warm_start)
        preload_compiler()
    threads = []
    for i in range(n):
        worker = make_worker(queue, paths, **worker_options)
        thread = threading.Thread(target=worker.run_forever, args=(stop,), name=f"train-worker-{i}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads
