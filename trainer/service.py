"""TrainerService (protos/trainer.proto): validates train specs, enqueues them, reports on them, lists models.

The servicer holds no training logic: a spec becomes a TrainConfig through `trainer.spec` (the same check the
worker runs), the job goes to Redis through `jobs.queue.JobQueue`, and a worker process does the training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc

from jobs.queue import JobQueue
from model.artifact import ArtifactInfo, ArtifactStore
from model.onnx_contract import ONNX_DIR, VARIANT_FILES
from protos import common_pb2, jobs_pb2, trainer_pb2, trainer_pb2_grpc
from rpc.errors import invalid_argument
from rpc.job_calls import job_status, queue_errors, watch_events
from trainer.spec import SpecError, config_from_spec

__all__ = ["TrainerService", "SERVICE_NAME", "model_info"]

log = logging.getLogger(__name__)

SERVICE_NAME = "tinylm.v1.TrainerService"
# Files an exporter adds to an artifact -> the format name ModelInfo.formats reports.
_FORMAT_FILES = {
    **{f"onnx-{variant}": f"{ONNX_DIR}/{name}" for variant, name in VARIANT_FILES.items()},
    "coreml": "coreml",
    "hf": "hf",
}


class TrainerService(trainer_pb2_grpc.TrainerServiceServicer):
    """gRPC front of the train queue. `store_root` is the artifact store the workers write to."""

    def __init__(self, queue: JobQueue, store_root: Path):
        self.queue = queue
        self.store = ArtifactStore(store_root)

    def StartTraining(
        self, request: trainer_pb2.StartTrainingRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.StartTrainingResponse:
        spec = request.spec
        try:
            config_from_spec(spec)
        except SpecError as err:
            invalid_argument(context, f"spec.{err.field}", err.reason)
        if spec.corpus_path and not _is_file(spec.corpus_path):
            what = (
                "is a directory; give a UTF-8 text file"
                if _is_dir(spec.corpus_path)
                else "does not exist on the trainer"
            )
            invalid_argument(context, "spec.corpus_path", f"{spec.corpus_path!r} {what}")
        with queue_errors(context):
            job_id = self.queue.submit("train", spec, idempotency_key=request.idempotency_key)
            status = self.queue.get(job_id)
        log.info("enqueued train job %s (preset %s)", job_id, spec.preset)
        return trainer_pb2.StartTrainingResponse(job_id=job_id, status=status)

    def WatchTraining(
        self, request: trainer_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.JobEvent]:
        self._train_job(request.job_id, context)
        yield from watch_events(self.queue, request.job_id, context, from_start=request.from_start)

    def GetTraining(self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
        return self._train_job(request.job_id, context)

    def CancelTraining(
        self, request: trainer_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.JobStatus:
        self._train_job(request.job_id, context)
        with queue_errors(context):
            return self.queue.cancel(request.job_id)

    def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        infos = [i for i in reversed(self.store.list()) if i.name.startswith(request.name_prefix)]
        return common_pb2.ListModelsResponse(models=[model_info(i) for i in infos])

    def _train_job(self, job_id: str, context: grpc.ServicerContext) -> jobs_pb2.JobStatus:
        """The status of train job `job_id`; aborts INVALID_ARGUMENT (empty id) or NOT_FOUND (no such train job)."""
        return job_status(self.queue, job_id, "train", context)


def model_info(info: ArtifactInfo) -> common_pb2.ModelInfo:
    """An artifact store entry as the wire's ModelInfo."""
    manifest = info.manifest
    metrics = {k: float(v) for k, v in (manifest.get("metrics") or {}).items() if isinstance(v, (int, float))}
    try:
        created = datetime.fromisoformat(info.created_at).timestamp()
    except ValueError:
        created = info.path.stat().st_mtime
    return common_pb2.ModelInfo(
        id=info.id,
        name=info.name,
        preset=info.preset,
        n_params=int(manifest.get("num_params", 0)),
        parent_id=info.parent_id or "",
        path=str(info.path.resolve()),
        created_unix=created,
        formats=[fmt for fmt, rel in _FORMAT_FILES.items() if (info.path / rel).exists()],
        metrics=metrics,
    )


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # too long for a path, or a NUL byte
        return False


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False
