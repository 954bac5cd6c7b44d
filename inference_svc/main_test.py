"""`python -m inference_svc serve`: finds the model, serves it (with a bearer token, also over HTTP with --http-port), stops on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from inference_svc.metrics import PREFIX
from inference_svc.testing import wait_until
from protos import inference_pb2, inference_pb2_grpc
from rpc.client import channel

ROOT = Path(__file__).resolve().parent.parent


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "TINYLM_HOME": str(home), "PYTHONPATH": str(ROOT), "TINYLM_TOKEN": ""}


def test_no_model_in_the_store_says_how_to_make_one(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "inference_svc", "--port", "0"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "no artifacts in" in proc.stderr and "./tinylm train" in proc.stderr


@pytest.mark.parametrize("flags", [[], ["--engine-process"]])
def test_a_draft_with_another_tokenizer_is_refused(tiny, tmp_path, capsys, flags):
    """In-process, and from the engine process (its build's ValueError raised in the server's process)."""
    from inference_svc.main import main
    from model.artifact import save_artifact
    from model.presets import get_preset
    from model.tokenizers import CharTokenizer
    from model.transformer import GPT

    other = CharTokenizer.from_corpus("zyxwvutsrqponmlkjihgfedcba ,.!:'")
    draft_id = save_artifact(
        tmp_path / "store",
        GPT(get_preset("tiny", vocab_size=other.vocab_size, n_layer=1)),
        other,
        name="other-tokenizer",
        preset="tiny",
    )
    code = main(["--model", str(tiny.path), "--draft-model", str(tmp_path / "store" / draft_id), "--port", "0", *flags])
    assert code == 1
    assert "--draft-model must use the served model's tokenizer" in capsys.readouterr().err


def test_serves_the_newest_artifact_with_a_token_until_sigterm(tiny, tmp_path):
    (tmp_path / "artifacts").symlink_to(tiny.store, target_is_directory=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inference_svc",
            "serve",
            "--port",
            "0",
            "--token",
            "s3cret",
            "--max-slots",
            "2",
            "--draft-model",
            str(tiny.path),
            "--speculative-k",
            "2",
        ],  # the model as its own draft: wiring only
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving (\w+) \(tiny-test\) with torch on (\S+)", line)
        assert match and match.group(1) == tiny.model_id, line
        address = match.group(2)
        request = inference_pb2.GenerateRequest(
            prompt="to be", params=inference_pb2.SamplingParameters(max_new_tokens=5)
        )
        with channel(address, token="s3cret") as ch:
            responses = list(inference_pb2_grpc.InferenceServiceStub(ch).Generate(request, timeout=60))
        assert sum(len(r.token_ids) for r in responses) == 5
        assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        with channel(address) as ch, pytest.raises(grpc.RpcError) as err:
            list(inference_pb2_grpc.InferenceServiceStub(ch).Generate(request, timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> set[int]:
    return {int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()}


def test_the_engine_process_serves_and_ends_with_the_server(tiny, tmp_path):
    """--engine-process: the model runs in a child process (spawned: main.py, run as __main__, is imported there as
    __mp_main__); a stream gets its tokens; SIGTERM ends the server, exit 0, and its children with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference_svc.main", "serve", "--model", str(tiny.path), "--port", "0", "--max-slots",
         "2", "--engine-process"],  # main.py as __main__ (the serving bench's way): the child finds build_engine
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        address = re.search(r"serving \w+ \(tiny-test\) with torch on (\S+)", line).group(1)
        children = _children(proc.pid)
        assert children  # the engine (and multiprocessing's resource tracker)
        request = inference_pb2.GenerateRequest(
            prompt="to be", params=inference_pb2.SamplingParameters(max_new_tokens=5)
        )
        with channel(address) as ch:
            responses = list(inference_pb2_grpc.InferenceServiceStub(ch).Generate(request, timeout=60))
        assert sum(len(r.token_ids) for r in responses) == 5
        assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert wait_until(lambda: not any(Path(f"/proc/{c}").exists() for c in children))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("engine_process", ["off", "on"])  # on: the default on CUDA
def test_serves_http_beside_grpc_with_the_same_token(tiny, tmp_path, engine_process):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inference_svc",
            "serve",
            "--model",
            str(tiny.path),
            "--port",
            "0",
            "--token",
            "s3cret",
            "--max-slots",
            "2",
            "--http-port",
            "0",
            "--engine-process",
            engine_process,
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert "serving" in proc.stdout.readline()
        url = re.search(r"http on (http://\S+) ", proc.stdout.readline()).group(1)
        body = json.dumps({"prompt": "to be", "max_tokens": 3}).encode()
        post = urllib.request.Request(f"{url}/v1/completions", body, {"authorization": "Bearer s3cret"})
        with urllib.request.urlopen(post, timeout=60) as reply:
            assert json.loads(reply.read())["usage"]["completion_tokens"] == 3
        post = urllib.request.Request(f"{url}/v1/completions", body)
        with pytest.raises(urllib.error.HTTPError) as err:  # the gRPC token guards HTTP too
            urllib.request.urlopen(post, timeout=60)
        assert err.value.code == 401
        metrics = urllib.request.Request(f"{url}/metrics", headers={"authorization": "Bearer s3cret"})
        with urllib.request.urlopen(metrics, timeout=60) as reply:  # the engine's counters, whichever process runs it
            lines = reply.read().decode().splitlines()
        generated = [float(line.split()[-1]) for line in lines if line.startswith(f"{PREFIX}_generation_tokens_total")]
        assert generated == [3.0]  # the one request that passed the token
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _copy(tiny, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny.path, tmp_path / tiny.model_id))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-slots", "-3"], "--max-slots must be an integer >= 1 (0: the default), got -3"),
        (["--max-queue", "-1"], "--max-queue must be an integer >= 0, got -1"),
        (["--speculative-k", "0"], "--speculative-k must be an integer >= 1, got 0"),
        (["--decode-steps", "65"], "--decode-steps must be an integer 0..64 (0: the default), got 65"),
        (["--decode-steps", "-1"], "--decode-steps must be an integer 0..64 (0: the default), got -1"),
    ],
)
def test_bad_flags_name_themselves(tiny, capsys, argv, words):
    """Issue 22 finding 7: `--max-slots -3` reported "got -2"."""
    from inference_svc.main import main

    assert main(["--model", str(tiny.path), "--port", "0", *argv]) == 2
    assert words in capsys.readouterr().err


def test_a_pickle_model_path_is_refused_as_a_pickle(tmp_path, capsys):
    """Issue 22 finding 7: `serve --model path/model.pt` said "no artifact matches"."""
    from inference_svc.main import main

    assert main(["--model", str(tmp_path / "model.pt"), "--port", "0"]) == 1
    assert "pickle files" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_bad_weights_are_one_line_and_exit_1(tiny, tmp_path, backend):
    """Issue 22 finding 2: serve on invalid safetensors (re-hashed) or on a corrupt .onnx printed a traceback."""
    path = _copy(tiny, tmp_path)
    if backend == "torch":
        from model.artifact import CONTENT_FILES, ID_LEN, _content_hash, _sha256

        (path / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
        manifest = json.loads((path / "manifest.json").read_text())  # re-hashed: the hash check passes
        manifest["files"] = {f: _sha256(path / f) for f in CONTENT_FILES}
        manifest["id"] = _content_hash(manifest["files"])[:ID_LEN]
        (path / "manifest.json").write_text(json.dumps(manifest))
    else:
        (path / "onnx").mkdir()
        (path / "onnx" / "model.onnx").write_bytes(b"\x00garbage, not a protobuf" * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "inference_svc", "--model", str(path), "--backend", backend, "--port", "0"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("tinylm serve: ")
    assert (
        "model.safetensors is not a valid safetensors file"
        if backend == "torch"
        else "model.onnx is not a loadable ONNX model"
    ) in lines[0]


def test_cpu_weights_flag_reaches_the_runner_and_a_bad_value_names_the_choices(tiny, capsys):
    """--cpu-weights int8 gives a runner on weight-only INT8 Linears; a value outside the choices is refused by name;
    with the ONNX backend (its weights are --onnx-file's) it is refused, exit 1."""
    from inference_svc.cpu_weights import CpuInt8Linear
    from inference_svc.main import _runner, build_parser, main

    args = build_parser().parse_args(["--model", str(tiny.path), "--device", "cpu", "--cpu-weights", "int8"])
    runner, _, _ = _runner(args, tiny.path)
    assert runner.cpu_weights == "int8" and type(runner.model.lm_head) is CpuInt8Linear
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tiny.path), "--port", "0", "--cpu-weights", "int4"])
    assert exit_.value.code == 2
    assert "--cpu-weights: invalid choice: 'int4' (choose from 'fp32', 'bf16', 'int8')" in capsys.readouterr().err
    assert main(["--model", str(tiny.path), "--port", "0", "--backend", "onnx", "--cpu-weights", "int8"]) == 1
    assert "--cpu-weights is for --backend torch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--device", "cuda"], True),  # auto: the torch backend on CUDA (H200: 256 gRPC streams 141k -> 260k tokens/s)
        (["--device", "cpu"], False),  # auto on CPU: no gain on 2 cores
        (["--device", "cuda", "--backend", "onnx"], False),
        (["--device", "cuda", "--engine-process", "off"], False),
        (["--device", "cpu", "--engine-process"], True),  # the bare flag: on
        (["--device", "cpu", "--engine-process", "on"], True),
    ],
)
def test_the_engine_process_is_on_by_default_for_torch_on_cuda(flags, want):
    from inference_svc.main import _engine_process, build_parser

    assert _engine_process(build_parser().parse_args(flags)) is want


def test_a_bad_engine_process_choice_names_the_allowed_values(capsys):
    from inference_svc.main import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--engine-process", "maybe"])
    assert exit_info.value.code == 2
    assert "choose from 'auto', 'on', 'off'" in capsys.readouterr().err
