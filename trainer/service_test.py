"""TrainerService end to end: real gRPC over loopback, a real redis-server, a worker thread that really trains."""

import json
import threading
import time

import grpc
import pytest

from jobs.queue import JobQueue
from jobs.testing import RedisServer
from protos import common_pb2, jobs_pb2, trainer_pb2, trainer_pb2_grpc
from rpc.client import channel
from rpc.server import serve
from trainer.service import SERVICE_NAME, TrainerService
from trainer.testing import write_small_corpus
from trainer.worker import TrainerPaths, make_worker

FAST = {"block_size": "32", "eval_iters": "2", "log_interval": "1", "tensorboard": "false", "warmup": "1"}


@pytest.fixture()
def stack(tmp_path):
    """Redis, the service on a loopback port, one worker thread; yields (stub, queue, paths, corpus path)."""
    corpus = write_small_corpus(tmp_path / "corpus.txt")
    paths = TrainerPaths(home=tmp_path / "home", default_corpus=str(corpus))
    with RedisServer() as redis_server:
        queue = JobQueue(redis_server.url)
        server = serve(
            [(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerService(queue, paths.store_root))],
            [SERVICE_NAME],
        )
        stop = threading.Event()
        worker = make_worker(JobQueue(redis_server.url), paths, poll_s=0.1, heartbeat_s=0.1, max_attempts=1)
        thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
        thread.start()
        ch = channel(server.address)
        try:
            yield trainer_pb2_grpc.TrainerServiceStub(ch), queue, paths, corpus
        finally:
            stop.set()
            thread.join(timeout=30)
            ch.close()
            server.stop(0)
            queue.close()


def _spec(corpus, **fields):
    spec = jobs_pb2.TrainSpec(preset="tiny", corpus_path=str(corpus), max_steps=6, batch_size=4, eval_interval=3,
                              device="cpu", model_name="svc-test")  # fmt: skip
    spec.overrides.update(FAST)
    for name, value in fields.items():
        if name == "overrides":
            spec.overrides.update(value)
        else:
            setattr(spec, name, value)
    return spec


def test_a_job_runs_end_to_end_and_streams_its_events(stack):
    stub, queue, paths, corpus = stack
    spec = _spec(corpus)
    spec.then_export.formats.append("onnx")
    started = stub.StartTraining(trainer_pb2.StartTrainingRequest(spec=spec), timeout=10)
    assert started.status.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)  # a worker may be quick
    events = list(stub.WatchTraining(trainer_pb2.WatchRequest(job_id=started.job_id, from_start=True), timeout=120))
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    steps = [e for e in events if e.message.startswith("step ")]
    assert len(steps) >= 6 and steps[-1].progress == 1.0
    assert any("val_loss" in e.metrics for e in steps) and all("loss" in e.metrics for e in steps)
    assert all(e.metrics["grad_norm"] > 0 for e in steps)  # before clipping, every logged step
    assert steps[0].message.startswith("step 1/6 loss ") and " | grad norm " in steps[0].message

    status = stub.GetTraining(trainer_pb2.GetJobRequest(job_id=started.job_id), timeout=10)
    result = json.loads(status.result_json)
    assert result["steps"] == 6 and result["stopped"] == "completed"
    assert (paths.store_root / result["model_id"] / "manifest.json").is_file()
    # The pipeline: an export job for the new model, enqueued by the worker.
    (child_id,) = status.child_ids
    child = queue.get(child_id)
    assert child.job.export.model_id == result["model_id"] and list(child.job.export.formats) == ["onnx"]
    assert child.job.parent_id == started.job_id

    models = stub.ListModels(common_pb2.ListModelsRequest(name_prefix="svc"), timeout=10).models
    assert [m.id for m in models] == [result["model_id"]]
    assert models[0].preset == "tiny" and models[0].n_params > 0 and models[0].metrics["val_loss"] > 0
    assert not stub.ListModels(common_pb2.ListModelsRequest(name_prefix="other"), timeout=10).models


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"preset": "huge"}, "spec.preset"),
        ({"preset": ""}, "spec.preset"),
        ({"learning_rate": -1.0}, "spec.learning_rate"),
        ({"learning_rate": 50.0}, "spec.learning_rate"),
        ({"max_steps": -5}, "spec.max_steps"),
        ({"tokenizer": "words"}, "spec.tokenizer"),
        ({"device": "tpu"}, "spec.device"),
        ({"corpus_path": "/nonexistent/corpus.txt"}, "spec.corpus_path"),
        ({"overrides": {"nope": "1"}}, "spec.overrides[nope]"),
        ({"overrides": {"dropout": "2"}}, "spec.overrides[dropout]"),
        ({"overrides": {"log_dir": "/etc"}}, "spec.overrides[log_dir]"),
    ],
)
def test_bad_specs_are_invalid_argument_naming_the_field(stack, fields, field):
    stub, queue, _, corpus = stack
    with pytest.raises(grpc.RpcError) as info:
        stub.StartTraining(trainer_pb2.StartTrainingRequest(spec=_spec(corpus, **fields)), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":")
    assert queue.list(kind="train") == []


def test_bad_export_format_and_unknown_jobs(stack):
    stub, _, _, corpus = stack
    spec = _spec(corpus)
    spec.then_export.formats.append("tflite")
    with pytest.raises(grpc.RpcError) as info:
        stub.StartTraining(trainer_pb2.StartTrainingRequest(spec=spec), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.then_export.formats[0]" in info.value.details()
    spec = _spec(corpus)  # issue 22 finding 4: a nested bench spec was accepted and failed hours later
    spec.then_export.formats.append("onnx")
    spec.then_export.then_bench.suites.extend(["kvcache", "nosuch"])
    with pytest.raises(grpc.RpcError) as info:
        stub.StartTraining(trainer_pb2.StartTrainingRequest(spec=spec), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        info.value.details().startswith("spec.then_export.then_bench.suites[1]:") and "'nosuch'" in info.value.details()
    )
    with pytest.raises(grpc.RpcError) as info:  # issue 22 finding 7: a directory was said to not exist
        stub.StartTraining(
            trainer_pb2.StartTrainingRequest(spec=_spec(corpus, corpus_path=str(corpus.parent))), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is a directory" in info.value.details()
    for call, request in [
        (stub.GetTraining, trainer_pb2.GetJobRequest(job_id="feedface")),
        (stub.CancelTraining, trainer_pb2.CancelJobRequest(job_id="feedface")),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        list(stub.WatchTraining(trainer_pb2.WatchRequest(job_id="feedface"), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.GetTraining(trainer_pb2.GetJobRequest(job_id=""), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id" in info.value.details()


def test_cancel_stops_the_run_at_its_next_step(stack):
    stub, queue, paths, corpus = stack
    spec = _spec(corpus, max_steps=100000, eval_interval=5)
    request = trainer_pb2.StartTrainingRequest(spec=spec, idempotency_key="cancel-me")
    job_id = stub.StartTraining(request, timeout=10).job_id
    assert stub.StartTraining(request, timeout=10).job_id == job_id  # the same key: the same job
    watch = stub.WatchTraining(trainer_pb2.WatchRequest(job_id=job_id, from_start=True), timeout=120)
    seen = []
    for event in watch:
        seen.append(event)
        if "val_loss" in event.metrics:  # an evaluation happened: a best checkpoint exists
            break
    cancelled_at = time.time()
    stub.CancelTraining(trainer_pb2.CancelJobRequest(job_id=job_id), timeout=10)
    rest = list(stub.WatchTraining(trainer_pb2.WatchRequest(job_id=job_id), timeout=60))
    assert rest[-1].state == jobs_pb2.JOB_STATE_CANCELLED
    status = stub.GetTraining(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)
    assert status.state == jobs_pb2.JOB_STATE_CANCELLED and not status.result_json
    run_dir = paths.runs / job_id
    state = json.loads((run_dir / "resume" / "state.json").read_text())
    assert 5 <= state["step"] < 100000
    assert (run_dir / "best" / "model.safetensors").is_file()  # the last good checkpoint is kept
    assert all(e.time_unix < cancelled_at + 30 for e in rest)
    assert not any(paths.store_root.glob("*/manifest.json"))  # a cancelled run publishes nothing


def test_a_corpus_no_retry_can_fix_fails_the_train_job_permanently(tmp_path):
    """Issue 22, finding 7: without the corpus a train job was retried three times; now it fails at once, saying why."""
    import threading

    from jobs.context import JobContext
    from jobs.errors import PermanentJobError
    from trainer.worker import TrainerPaths, make_train_handler

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    handle = make_train_handler(TrainerPaths(home=tmp_path))
    job = jobs_pb2.Job(id="j", kind=jobs_pb2.JOB_KIND_TRAIN, attempt=1,
                       train=jobs_pb2.TrainSpec(preset="tiny", corpus_path=str(empty)))  # fmt: skip
    ctx = JobContext(job, "w", lambda message, fraction, metrics: None, threading.Event(), threading.Event())
    with pytest.raises(PermanentJobError, match="empty.txt"):
        handle(ctx)
