"""`./tinylm export` and `python -m exporter.main serve`: flags, environment variables and wiring only.

    ./tinylm export MODEL [--formats onnx,int8,int4,coreml,hf] [--no-gate] [--json]
    python -m exporter.main serve [--port 0] [--workers 1]            # ExporterService + export-queue worker

MODEL is an artifact id, a unique id prefix, a name (the newest artifact with it), or an artifact folder.
Environment: TINYLM_HOME (default ~/.tinylm; artifacts in $TINYLM_HOME/artifacts), TINYLM_CORPUS (its held-out
tail scores the exports; without it the model's own samples stand in), TINYLM_REDIS_URL and TINYLM_TOKEN (serve).
Exit status: 0 exported and every gate passed, 1 a gate failed (with --no-gate: files kept, marked failed) or
the export failed, 2 bad usage (unknown model or format).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

__all__ = ["main", "tinylm_home"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def tinylm_home(env: Mapping[str, str]) -> Path:
    """$TINYLM_HOME, or ~/.tinylm."""
    return Path(env.get("TINYLM_HOME") or Path.home() / ".tinylm").expanduser()


def _export_parser() -> argparse.ArgumentParser:
    from exporter.formats import FORMATS

    p = argparse.ArgumentParser(prog="tinylm export", description="Export a model, measure parity, apply the gates.")
    p.add_argument("model", nargs="?", help="artifact id, id prefix, name, or folder")
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="same as the positional MODEL")
    p.add_argument("--formats", default="", help=f"comma-separated: {','.join(FORMATS)} (default: all)")
    p.add_argument("--no-gate", action="store_true", help="keep variants whose parity gate failed (marked failed)")
    p.add_argument("--json", action="store_true", help="print the parity report as JSON instead of a table")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: their default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exporter.main serve", description="Run ExporterService and workers.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=0, help="port (0: a free one, printed at start)")
    p.add_argument("--redis-url", help="Redis holding the job queue (default $TINYLM_REDIS_URL)")
    p.add_argument("--workers", type=int, default=1, help="export-queue worker threads in this process (0: none)")
    p.add_argument("--token", help="require this bearer token (default $TINYLM_TOKEN, if set)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate (with --tls-key) for TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics (queue depth, running jobs, dead letters, job durations) on this port of --host (0: a free one); off by default",
    )
    return p


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    if argv[:1] == ["serve"]:
        return _serve(argv[1:], env)
    if argv[:1] == ["export"]:
        argv = argv[1:]
    return _export(argv, env)


def _corpus(env: Mapping[str, str]) -> Path | None:
    path = env.get("TINYLM_CORPUS")
    return Path(path) if path and Path(path).is_file() else None


def _resolve(ref: str, store_root: Path) -> Path:
    from model.artifact import ArtifactStore

    if Path(ref).is_dir():
        return Path(ref)
    return ArtifactStore(store_root).resolve(ref)


def _export(argv: list[str], env: Mapping[str, str]) -> int:
    import torch

    from exporter.errors import ExportError, GateFailed
    from exporter.export import export_artifact
    from exporter.formats import parse_formats
    from exporter.parity import held_out_text
    from exporter.parity_table import format_table
    from model.artifact import ArtifactError

    parser = _export_parser()
    args = parser.parse_args(argv)
    ref = args.model or args.model_flag
    if not ref:
        parser.error("MODEL is required (an artifact id, id prefix, name or folder)")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        formats = parse_formats(args.formats)
        artifact = _resolve(ref, tinylm_home(env) / "artifacts")
    except (ExportError, ArtifactError) as err:
        print(f"tinylm export: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = _corpus(env)
    if corpus is None:
        print("tinylm export: TINYLM_CORPUS not set; scoring val loss on the model's own samples", file=sys.stderr)

    def progress(message: str, fraction: float) -> None:
        if not args.quiet:
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    try:
        report = export_artifact(
            artifact,
            formats,
            eval_text=held_out_text(corpus.read_text(encoding="utf-8")) if corpus else None,
            no_gate=args.no_gate,
            progress=progress,
        )
    except GateFailed as err:
        print(json.dumps(err.report, indent=2) if args.json else format_table(err.report))
        print(f"tinylm export: {err}", file=sys.stderr)
        return EXIT_FAILED
    except ExportError as err:
        print(f"tinylm export: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if not args.json:
        print(f"written to {artifact}", file=sys.stderr)
    return EXIT_OK if report["passed"] else EXIT_FAILED


def _serve(argv: list[str], env: Mapping[str, str]) -> int:
    from exporter.service import SERVICE_NAME, ExporterService
    from exporter.worker import ExporterPaths, run_workers
    from jobs.metrics import JobMetrics, serve_metrics
    from jobs.queue import JobQueue
    from protos import exporter_pb2_grpc
    from rpc.server import serve_from_args, serve_until_signalled

    parser = _serve_parser()
    args = parser.parse_args(argv)
    redis_url = args.redis_url or env.get("TINYLM_REDIS_URL")
    if not redis_url:
        parser.error("--redis-url or TINYLM_REDIS_URL is required")
    if args.workers < 0 or (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--workers must be >= 0; give --tls-cert and --tls-key together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    paths = ExporterPaths(store_root=tinylm_home(env) / "artifacts", corpus=_corpus(env))
    queue = JobQueue(redis_url)
    server = serve_from_args(
        [(exporter_pb2_grpc.add_ExporterServiceServicer_to_server, ExporterService(queue, paths.store_root))],
        [SERVICE_NAME],
        args,
        token=args.token or env.get("TINYLM_TOKEN"),
    )
    stop = threading.Event()
    metrics = JobMetrics(queue) if args.metrics_port is not None else None
    workers = run_workers(
        JobQueue(redis_url), paths, args.workers, stop, on_finished=metrics.observe if metrics else None
    )
    print(
        f"ExporterService listening on {server.address} ({args.workers} worker(s), store {paths.store_root})",
        flush=True,
    )
    metrics_server = serve_metrics(metrics.registry, args.host, args.metrics_port) if metrics else None
    if metrics_server:
        print(f"metrics on {metrics_server.url}", flush=True)
    serve_until_signalled(server, workers, stop, drain_s=120.0)
    if metrics_server:
        metrics_server.stop()
    queue.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
