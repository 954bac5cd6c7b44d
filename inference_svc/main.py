"""`./tinylm serve`: load an artifact, start the engine and serve `InferenceService` until SIGINT/SIGTERM.

    ./tinylm serve [--model ID|NAME|PATH] [--backend torch|onnx] [--onnx-file fp32|fp16|int8|int4]
                   [--device auto|cpu|cuda] [--cpu-weights fp32|bf16|int8]
                   [--grpc-server aio|threads] [--host 127.0.0.1] [--port 50053] [--tls-cert F --tls-key F]
                   [--token T] [--http-port 8000] [--engine-process [auto|on|off]]

With no --model it serves the newest artifact in the store ($TINYLM_HOME/artifacts, default
~/.tinylm/artifacts). With --http-port it also serves the OpenAI-compatible HTTP API (/v1/completions,
/v1/models, /health) and Prometheus /metrics on the same engine (inference_svc/http_api.py). With --engine-process
(on by default for the torch backend on CUDA) the engine runs in a child process of its own
(inference_svc/engine_process.py), off the gRPC server's GIL.
Also `python -m inference_svc` and `bazel run //inference_svc -- ...`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import faulthandler
import signal
import sys
import threading
from pathlib import Path

import torch

from inference_svc.engine import DECODE_STEPS_GRAPHS, DECODE_STEPS_SMALL_BATCH, Engine
from inference_svc.runner import MAX_DECODE_STEPS, MULTI_STEP_GRAPH_MAX_BATCH, ModelRunner, TorchRunner
from inference_svc.aio_server import AioRunningServer, serve_aio
from inference_svc.cpu_weights import CPU_WEIGHTS
from inference_svc.engine_process import EngineProcess
from inference_svc.service import (
    SERVICE_NAME,
    STREAM_MESSAGES_PER_S,
    AsyncInferenceService,
    InferenceService,
    ServedModel,
)
from model.artifact import (
    PICKLE_SUFFIXES,
    ArtifactError,
    ArtifactStore,
    check_tokenizer_fits,
    load_artifact,
    verify_artifact,
)
from model.tokenizers import Tokenizer, load_tokenizer
from protos import inference_pb2_grpc
from rpc.server import RunningServer, serve

__all__ = ["main", "build_parser", "artifact_path", "build_engine", "start_grpc", "SERVERS"]

log = logging.getLogger("inference_svc")

SERVERS = ("aio", "threads")  # start_grpc's server constructions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinylm serve", description="Serve a model over streaming gRPC (InferenceService)."
    )
    p.add_argument(
        "--model", default="", help="artifact id (or unique prefix), name, or folder; default: the newest in the store"
    )
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="model runner (default torch)")
    p.add_argument(
        "--onnx-file", default="fp32", choices=["fp32", "fp16", "int8", "int4"], help="ONNX variant for --backend onnx"
    )
    p.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, cuda:1")
    p.add_argument(
        "--max-slots", type=int, default=0, help="concurrent sequences (KV-cache slots); default 256 on CUDA, 16 on CPU"
    )
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting for a slot before RESOURCE_EXHAUSTED")
    p.add_argument(
        "--draft-model",
        default="",
        help="speculative decoding: a smaller artifact with the same tokenizer "
        "(id prefix, name or folder; torch backend only)",
    )
    p.add_argument("--speculative-k", type=int, default=3, help="draft tokens proposed per step (with --draft-model)")
    p.add_argument(
        "--decode-steps",
        type=int,
        default=0,
        help=f"decode steps launched per engine step, 1..{MAX_DECODE_STEPS} (0: the engine's default, "
        f"with CUDA graphs {DECODE_STEPS_SMALL_BATCH} up to {MULTI_STEP_GRAPH_MAX_BATCH} running requests and "
        f"{DECODE_STEPS_GRAPHS} above, else 1); more: fewer host costs per token, burstier streams",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: their default)")
    p.add_argument(
        "--cpu-weights",
        choices=CPU_WEIGHTS,
        default="fp32",
        help="weights of --backend torch on a CPU device (default fp32; int8: weight-only INT8 Linears, the batch-1 "
        "decode step compiled at start, 20-60 s; bf16: the model in bf16): fewer bytes per decoded token "
        "(inference_svc/PERF_NOTES.md sections 10, 15)",
    )
    p.add_argument(
        "--stream-messages-per-s",
        type=float,
        default=STREAM_MESSAGES_PER_S,
        help="stream messages per second the server sends, shared by its open streams: tokens made between a "
        f"stream's messages go in one (> 0; default {STREAM_MESSAGES_PER_S:g}; inf: a message per token)",
    )
    p.add_argument(
        "--grpc-server",
        choices=SERVERS,
        default="aio",
        help="aio: every stream served from one event-loop thread (default); threads: a thread per call",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=50053, help="port (0 picks a free one)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key): serve TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument(
        "--token",
        default=os.environ.get("TINYLM_TOKEN", ""),
        help="require `authorization: Bearer TOKEN` (env TINYLM_TOKEN)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve OpenAI-compatible HTTP (/v1/completions, /v1/models, "
        "/health) and Prometheus /metrics on this port of --host (0 picks a free one); off by default",
    )
    p.add_argument(
        "--engine-process",
        nargs="?",
        const="on",
        default="auto",
        choices=["auto", "on", "off"],
        help="run the engine in a child process of its own: the gRPC server's writes stop sharing its GIL, each engine "
        "step's tokens reach the server as one message over a pipe. auto (default): on for the torch backend on CUDA "
        "(H200: 256 gRPC streams 141k -> 260k tokens/s), off on CPU (2 cores: no gain); inference_svc/PERF_NOTES.md 18, 20",
    )
    return p


def artifact_path(ref: str, store_root: Path) -> Path:
    """The artifact folder `ref` names (a folder, an id prefix or a name), or the store's newest when empty."""
    if ref and Path(ref).expanduser().is_dir():
        return Path(ref).expanduser()
    if ref and Path(ref).suffix.lower() in PICKLE_SUFFIXES:
        raise ArtifactError(
            f"refusing to load {ref}: pickle files ({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code; "
            "serve an artifact folder (model.safetensors + manifest.json) made by ./tinylm train"
        )
    store = ArtifactStore(store_root)
    return store.resolve(ref) if ref else store.newest().path


def _runner(args: argparse.Namespace, path: Path) -> tuple[ModelRunner, Tokenizer, dict]:
    if args.backend == "onnx" and args.cpu_weights != "fp32":
        raise ValueError("--cpu-weights is for --backend torch (ONNX Runtime's weights: --onnx-file)")
    if args.backend == "onnx":
        from inference_svc.ort_runner import OrtRunner  # onnxruntime only when asked for

        manifest = verify_artifact(path)
        slots = args.max_slots or 16
        runner, tokenizer = OrtRunner(path, slots, variant=args.onnx_file, threads=args.threads), load_tokenizer(path)
        check_tokenizer_fits(tokenizer, runner.vocab_size, path)
        return runner, tokenizer, manifest
    device = _device(args)
    artifact = load_artifact(path, device=device)
    runner = TorchRunner(artifact.model, _slots(args, device), device=device, cpu_weights=args.cpu_weights)
    return runner, artifact.tokenizer, artifact.manifest


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _engine_process(args: argparse.Namespace) -> bool:
    """--engine-process: on, off, or auto (`engine_process_by_default`)."""
    if args.engine_process != "auto":
        return args.engine_process == "on"
    return engine_process_by_default(args.backend, _device(args))


def engine_process_by_default(backend: str, device: torch.device) -> bool:
    """`serve --engine-process auto`: the engine in its own process for the torch backend on a CUDA device (the gRPC
    server's GIL was the ceiling there), on a thread elsewhere (the 2-core CPU machine lost with the process)."""
    return backend == "torch" and device.type == "cuda"


def _slots(args: argparse.Namespace, device: torch.device) -> int:
    return args.max_slots or (256 if device.type == "cuda" else 16)


def _draft_runner(args: argparse.Namespace, store_root: Path, tokenizer: Tokenizer) -> TorchRunner | None:
    """The --draft-model's runner, or None without one; refuses the ONNX backend and a different tokenizer."""
    if not args.draft_model:
        return None
    if args.backend != "torch":
        raise ValueError("--draft-model needs --backend torch (speculative decoding runs on torch runners)")
    device = _device(args)
    draft = load_artifact(artifact_path(args.draft_model, store_root), device=device)
    if draft.tokenizer.to_json() != tokenizer.to_json():
        raise ValueError("--draft-model must use the served model's tokenizer (same vocabulary, same ids)")
    return TorchRunner(draft.model, _slots(args, device), device=device)


def build_engine(args: argparse.Namespace, path: Path, store_root: Path) -> Engine:
    """The engine `serve` runs over the artifact at `path` (the engine process's build: picklable with its args)."""
    return _engine_and_manifest(args, path, store_root)[0]


def _engine_and_manifest(args: argparse.Namespace, path: Path, store_root: Path) -> tuple[Engine, dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    runner, tokenizer, manifest = _runner(args, path)
    draft = _draft_runner(args, store_root, tokenizer)
    engine = Engine(runner, tokenizer, max_queue=args.max_queue, draft=draft, speculative_k=args.speculative_k,
                    decode_steps=args.decode_steps or None)  # fmt: skip
    return engine, manifest


def start_grpc(
    engine: Engine | EngineProcess,
    model: ServedModel,
    *,
    server: str = "aio",
    messages_per_s: float = STREAM_MESSAGES_PER_S,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    token: str | None = None,
) -> AioRunningServer | RunningServer:
    """The gRPC server of `./tinylm serve` over `engine` (tools.grpc_probe starts the same one): "aio" serves every
    stream from one event-loop thread (AsyncInferenceService); "threads" a thread per call (InferenceService)."""
    add = inference_pb2_grpc.add_InferenceServiceServicer_to_server
    if server == "aio":
        service = AsyncInferenceService(engine, model, messages_per_s)
        tls = (tls_cert, tls_key) if tls_cert is not None or tls_key is not None else None
        return serve_aio([(add, service)], [SERVICE_NAME], host=host, port=port, tls=tls, token=token)
    if server != "threads":
        raise ValueError(f"server must be one of {SERVERS}, got {server!r}")
    service = InferenceService(engine, model, messages_per_s)
    return serve(
        [(add, service)], [SERVICE_NAME], host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, token=token,
        max_workers=engine.max_slots + 32,  # a streaming call holds a worker thread for its whole life
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # `python -m inference_svc serve ...`, as the stack launcher calls it
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if (args.tls_cert is None) != (args.tls_key is None):
        print("tinylm serve: give both --tls-cert and --tls-key, or neither", file=sys.stderr)
        return 2
    for flag, value, allowed in (("--max-slots", args.max_slots, ">= 1 (0: the default)"), ("--max-queue", args.max_queue, ">= 0"),
                                 ("--speculative-k", args.speculative_k, ">= 1"), ("--threads", args.threads, ">= 0 (0: the default)")):  # fmt: skip
        if value < (1 if flag == "--speculative-k" else 0):
            print(f"tinylm serve: {flag} must be an integer {allowed}, got {value}", file=sys.stderr)
            return 2
    if not 0 <= args.decode_steps <= MAX_DECODE_STEPS:
        print(f"tinylm serve: --decode-steps must be an integer 0..{MAX_DECODE_STEPS} (0: the default), got "
              f"{args.decode_steps}", file=sys.stderr)  # fmt: skip
        return 2
    if not args.stream_messages_per_s > 0:
        print(f"tinylm serve: --stream-messages-per-s must be > 0, got {args.stream_messages_per_s:g}", file=sys.stderr)
        return 2
    store_root = Path(os.environ.get("TINYLM_HOME") or Path.home() / ".tinylm").expanduser() / "artifacts"
    try:
        path = artifact_path(args.model, store_root)
        if _engine_process(args):  # the child loads the model; this process reads the manifest only
            manifest = verify_artifact(path)
            engine = EngineProcess(functools.partial(build_engine, args, path, store_root))
        else:
            engine, manifest = _engine_and_manifest(args, path, store_root)
    except (ArtifactError, FileNotFoundError, ValueError) as err:
        print(f"tinylm serve: {err}", file=sys.stderr)
        if not args.model:
            print(
                "make a model first: ./tinylm train --preset shakespeare-char (or pass --model PATH)", file=sys.stderr
            )
        return 1

    model = ServedModel(id=manifest["id"], name=str(manifest.get("name", "")), path=path, manifest=manifest)
    running = start_grpc(
        engine,
        model,
        server=args.grpc_server,
        messages_per_s=args.stream_messages_per_s,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        tls_key=args.tls_key.read_bytes() if args.tls_key else None,
        token=args.token or None,
    )
    print(f"serving {model.id} ({model.name}) with {args.backend} on {running.address}", flush=True)
    http = None
    if (
        args.http_port is not None
    ):  # starlette, uvicorn and prometheus_client only when asked for (the GPU machine lacks them)
        from inference_svc.http_api import build_app
        from inference_svc.http_server import serve_http
        from inference_svc.metrics import EngineMetrics

        metrics = EngineMetrics(engine, model.name or model.id)
        http = serve_http(
            build_app(engine, model, metrics, token=args.token or None), host=args.host, port=args.http_port
        )
        print(f"http on {http.url} (OpenAI-compatible {http.url}/v1, metrics {http.url}/metrics)", flush=True)

    stop = threading.Event()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to stderr
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # wake now and then: a signal delivered to another thread (CUDA's, gRPC's) leaves a
        pass  # blocked main thread asleep, and Python runs signal handlers only in the main thread when it wakes
    if http is not None:
        http.stop()
    running.stop(grace=2.0)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
