"""The generated tinylm.v1 modules import and carry the services, methods and fields the services rely on."""

from protos import bench_pb2, common_pb2, exporter_pb2, inference_pb2, jobs_pb2, trainer_pb2
from protos import bench_pb2_grpc, exporter_pb2_grpc, inference_pb2_grpc, trainer_pb2_grpc

SERVICES = {
    (trainer_pb2, "TrainerService"): {
        "StartTraining": (False, False),
        "WatchTraining": (False, True),
        "GetTraining": (False, False),
        "CancelTraining": (False, False),
        "ListModels": (False, False),
    },
    (exporter_pb2, "ExporterService"): {
        "StartExport": (False, False),
        "WatchExport": (False, True),
        "GetExport": (False, False),
    },
    (inference_pb2, "InferenceService"): {
        "Generate": (False, True),
        "GenerateBatch": (False, False),
        "ListModels": (False, False),
        "Tokenize": (False, False),
    },
    (bench_pb2, "BenchService"): {
        "StartBench": (False, False),
        "WatchBench": (False, True),
        "GetReport": (False, False),
    },
}


def test_every_file_is_in_package_tinylm_v1():
    for module in (common_pb2, jobs_pb2, trainer_pb2, exporter_pb2, inference_pb2, bench_pb2):
        assert module.DESCRIPTOR.package == "tinylm.v1", module.DESCRIPTOR.name


def test_services_have_their_methods_and_streaming_shape():
    for (module, name), methods in SERVICES.items():
        service = module.DESCRIPTOR.services_by_name[name]
        assert set(service.methods_by_name) == set(methods), name
        for method_name, (client_streaming, server_streaming) in methods.items():
            method = service.methods_by_name[method_name]
            assert method.client_streaming == client_streaming, method_name
            assert method.server_streaming == server_streaming, method_name


def test_stubs_and_servicers_are_generated():
    assert hasattr(trainer_pb2_grpc, "TrainerServiceStub") and hasattr(trainer_pb2_grpc, "TrainerServiceServicer")
    assert hasattr(exporter_pb2_grpc, "add_ExporterServiceServicer_to_server")
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")
    assert hasattr(bench_pb2_grpc, "BenchServiceStub")


def test_job_round_trips_with_its_oneof_spec():
    job = jobs_pb2.Job(
        id="abc",
        kind=jobs_pb2.JOB_KIND_TRAIN,
        attempt=1,
        train=jobs_pb2.TrainSpec(preset="tiny", max_steps=10, then_export=jobs_pb2.ExportSpec(formats=["onnx"])),
    )
    back = jobs_pb2.Job.FromString(job.SerializeToString())
    assert back.WhichOneof("spec") == "train"
    assert back.train.then_export.formats == ["onnx"]
    assert back == job


def test_field_numbers_are_stable():
    # Renumbering a field breaks every client on the wire: these numbers are part of the contract.
    fields = jobs_pb2.Job.DESCRIPTOR.fields_by_name
    assert {n: fields[n].number for n in ("id", "kind", "idempotency_key", "attempt", "train", "noop")} == {
        "id": 1,
        "kind": 2,
        "idempotency_key": 3,
        "attempt": 4,
        "train": 10,
        "noop": 13,
    }
    params = inference_pb2.SamplingParameters.DESCRIPTOR.fields_by_name
    assert params["max_new_tokens"].number == 1 and params["stop"].number == 9
    assert inference_pb2.FinishReason.Name(2) == "FINISH_REASON_STOP"


def test_every_field_and_method_is_documented():
    # DESIGN.md: comments on every field. The descriptors keep source info only in .proto files, so read them.
    import pathlib

    for module in (common_pb2, jobs_pb2, trainer_pb2, exporter_pb2, inference_pb2, bench_pb2):
        path = pathlib.Path(__file__).with_name(pathlib.Path(module.DESCRIPTOR.name).name)
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = (
                stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "package", "option"))
            )
            if is_field or stripped.startswith("rpc "):
                assert lines[i - 1].strip().startswith("//"), f"{path.name}:{i + 1} has no comment: {stripped}"
