"""Shared test fixtures: a run context on a tiny random-init model, and a small real gRPC InferenceService.

`CountingGenerator` is an in-test servicer (not a stand-in for our engine's logic): it streams `max_new_tokens`
tokens one chunk each, so the load generator's counting and timing can be checked against known numbers.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports triton (bench_svc.suite -> model -> kernels): Triton kernels then run through its CPU
    # interpreter, in these tests and in any test pytest collects after them in the same run (kernels/, model/).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_svc.suite import SuiteContext
from model.artifact import save_artifact
from model.presets import get_preset
from model.tokenizers import ByteTokenizer
from model.transformer import GPT
from protos import common_pb2, inference_pb2, inference_pb2_grpc
from rpc import errors, server

REPO_ROOT = Path(__file__).resolve().parent.parent
INFERENCE_NAME = "tinylm.v1.InferenceService"


class CountingGenerator(inference_pb2_grpc.InferenceServiceServicer):
    """Streams token ids 0..max_new_tokens-1, one per chunk, `token_delay_s` apart; counts the calls it served.

    With `fail_every` = k > 0, every k-th call ends with FINISH_REASON_ERROR after its tokens."""

    def __init__(self, token_delay_s: float = 0.002, fail_every: int = 0) -> None:
        self.token_delay_s = token_delay_s
        self.fail_every = fail_every
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def Generate(self, request, context):
        if request.params.max_new_tokens < 1:
            errors.invalid_argument(context, "params.max_new_tokens", "must be >= 1")
        with self._lock:
            self.calls += 1
            fail = self.fail_every > 0 and self.calls % self.fail_every == 0
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            start = time.perf_counter()
            n = request.params.max_new_tokens
            for i in range(n):
                if not context.is_active():
                    return
                time.sleep(self.token_delay_s)
                yield inference_pb2.GenerateResponse(request_id=request.request_id, token_ids=[i], text="x")
            if fail:
                yield inference_pb2.GenerateResponse(
                    request_id=request.request_id, finish_reason=inference_pb2.FINISH_REASON_ERROR, error="refused"
                )
                return
            yield inference_pb2.GenerateResponse(
                request_id=request.request_id,
                finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                usage=common_pb2.Usage(prompt_tokens=len(request.prompt), completion_tokens=n),
                timings=common_pb2.Timings(total_ms=(time.perf_counter() - start) * 1e3),
            )
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture
def counting_server():
    """(address, servicer) of a CountingGenerator served over real gRPC on loopback."""
    servicer = CountingGenerator()
    running = server.serve([(inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer)], [INFERENCE_NAME])
    yield running.address, servicer
    running.stop(0)


@pytest.fixture
def tiny_ctx(tmp_path) -> SuiteContext:
    """A quick run on the `tiny` preset (random init, CPU) writing into a fresh folder."""
    return SuiteContext(
        out_dir=tmp_path / "results",
        repo_root=REPO_ROOT,
        command=("pytest", "bench_svc"),
        quick=True,
        preset="tiny",
        python=sys.executable,
    )


@pytest.fixture
def tiny_artifact(tmp_path) -> Path:
    """The folder of a saved random-init `tiny` artifact (byte tokenizer) in a fresh store under tmp_path."""
    torch.manual_seed(0)
    store = tmp_path / "artifacts"
    model_id = save_artifact(store, GPT(get_preset("tiny")), ByteTokenizer(), name="bench-test", preset="tiny")
    return store / model_id
