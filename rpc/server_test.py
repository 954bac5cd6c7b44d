"""Servers built by rpc.server answer health and reflection, and enforce the bearer token and TLS when asked."""

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import inference_pb2, inference_pb2_grpc
from rpc import client, errors, server

NAME = "tinylm.v1.InferenceService"


class EchoTokenizer(inference_pb2_grpc.InferenceServiceServicer):
    """Tokenize answers the code points of the text; empty text is INVALID_ARGUMENT naming the field."""

    def Tokenize(self, request, context):
        if not request.text:
            errors.invalid_argument(context, "text", "must not be empty")
        return inference_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text], pieces=list(request.text))


def start(**kwargs):
    return server.serve(
        [(inference_pb2_grpc.add_InferenceServiceServicer_to_server, EchoTokenizer())], [NAME], **kwargs
    )


@pytest.fixture
def plain():
    running = start()
    yield running
    running.stop(0)


def test_health_reports_serving_for_the_service(plain):
    with client.channel(plain.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert plain.address.startswith("127.0.0.1:") and plain.port > 0


def test_reflection_lists_the_service(plain):
    with client.channel(plain.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
    names = {s.name for s in replies[0].list_services_response.service}
    assert NAME in names and "grpc.health.v1.Health" in names


def test_invalid_argument_names_the_field(plain):
    with client.channel(plain.address) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        assert list(stub.Tokenize(inference_pb2.TokenizeRequest(text="hi"), timeout=5).token_ids) == [104, 105]
        with pytest.raises(grpc.RpcError) as err:
            stub.Tokenize(inference_pb2.TokenizeRequest(text=""), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("text:")


def test_bearer_token_is_required_when_set():
    running = start(token="s3cret")
    try:
        request = inference_pb2.TokenizeRequest(text="a")
        for token, ok in ((None, False), ("wrong", False), ("s3cret", True)):
            with client.channel(running.address, token=token) as ch:
                stub = inference_pb2_grpc.InferenceServiceStub(ch)
                if ok:
                    assert list(stub.Tokenize(request, timeout=5).token_ids) == [97]
                else:
                    with pytest.raises(grpc.RpcError) as err:
                        stub.Tokenize(request, timeout=5)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with client.channel(running.address) as ch:  # health stays open without a token
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_tls_with_token(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    running = start(host="localhost", tls_cert=cert.read_bytes(), tls_key=key.read_bytes(), token="t")
    try:
        with client.channel(f"localhost:{running.port}", tls_ca=cert.read_bytes(), token="t") as ch:
            reply = inference_pb2_grpc.InferenceServiceStub(ch).Tokenize(
                inference_pb2.TokenizeRequest(text="ok"), timeout=5
            )
        assert list(reply.pieces) == ["o", "k"]
    finally:
        running.stop(0)


def test_half_tls_config_is_refused():
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        start(tls_cert=b"x")
