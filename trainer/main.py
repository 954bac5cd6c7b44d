"""`./tinylm train` and `python -m trainer.main [serve]`: flags, environment variables and wiring only.

    ./tinylm train --preset shakespeare-char [--config run.yaml] [--profile N] [key=value ...]
    torchrun --nproc_per_node=2 -m trainer.main --preset medium          # DDP: the same entry point
    python -m trainer.main serve [--port 50051] [--workers 1]            # TrainerService + train-queue worker

Environment: TINYLM_HOME (default ~/.tinylm; artifacts in $TINYLM_HOME/artifacts, runs in runs/, the tokenized
corpus cache in data/), TINYLM_CORPUS (the text to train on; default: Tiny Shakespeare, downloaded once with a
sha256 check), TINYLM_REDIS_URL (serve), torchrun's RANK / LOCAL_RANK / WORLD_SIZE.
Training prints the artifact id on stdout at the end; everything else goes to stderr (with --profile N, where
the torch.profiler trace of N steps went). The first Ctrl-C stops
at the next step and saves the resume state (`resume=true log_dir=<run folder>` continues); a second one aborts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["main", "tinylm_home"]

log = logging.getLogger("trainer")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def tinylm_home(env: Mapping[str, str]) -> Path:
    """$TINYLM_HOME, or ~/.tinylm."""
    return Path(env.get("TINYLM_HOME") or Path.home() / ".tinylm").expanduser()


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinylm train", description="Train a model; prints the artifact id.")
    p.add_argument(
        "--preset",
        help="tiny, small, shakespeare-char, shakespeare-char-fast, medium, large, gpt2-124m (default: tiny)",
    )
    p.add_argument("--config", type=Path, help="YAML file of TrainConfig keys (applied before key=value overrides)")
    p.add_argument("--name", help="artifact name (same as name=...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    p.add_argument(
        "--profile",
        type=_positive_int,
        default=0,
        metavar="N",
        help="write a torch.profiler trace of N steps (after 2 warm-up steps) to <run folder>/profile/",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig overrides, e.g. max_steps=2000")
    return p


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.main serve", description="Run TrainerService and workers.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=0, help="port (0: a free one, printed at start)")
    p.add_argument("--redis-url", help="Redis holding the job queue (default $TINYLM_REDIS_URL)")
    p.add_argument("--workers", type=int, default=1, help="train-queue worker threads in this process (0: none)")
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
    if argv[:1] == ["train"]:  # `python -m trainer.main train ...` reads naturally too
        argv = argv[1:]
    return _train(argv, env)


def _train(argv: list[str], env: Mapping[str, str]) -> int:
    from trainer import distributed as dist
    from trainer.config import ConfigError, load_config, parse_overrides
    from trainer.corpus import CorpusError, resolve_corpus
    from trainer.train import resolve_device, train

    args = _train_parser().parse_args(argv)
    info = dist.dist_from_env(env)
    logging.basicConfig(
        level=logging.WARNING if args.quiet or not info.is_main else logging.INFO,
        format=f"%(asctime)s [rank {info.rank}] %(name)s: %(message)s" if info.enabled else "%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    try:
        overrides = parse_overrides(args.overrides)
        if args.name:
            overrides["name"] = args.name
        config = load_config(args.preset, args.config, overrides)
    except (ConfigError, OSError) as err:
        print(f"tinylm train: {err}", file=sys.stderr)
        return EXIT_USAGE
    from trainer.warm_start import preload_for

    preload_for(config)  # CUDA's driver and torch's compiler, in the background while the run sets up
    home = tinylm_home(env)
    try:
        corpus = resolve_corpus(env.get("TINYLM_CORPUS"), home / "data")
    except CorpusError as err:
        hint = "" if "TINYLM_CORPUS" in str(err) else " (set TINYLM_CORPUS to a text file)"
        print(f"tinylm train: {err}{hint}", file=sys.stderr)
        return EXIT_FAILED

    device = resolve_device(config.device, info)
    dist.init_process_group(info, device)  # before the run folder is chosen: rank 0 names it for all
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.log_dir) if config.log_dir else home / "runs" / f"{config.model_name}-{stamp}"
    run_dir = Path(dist.gather(str(run_dir), info)[0])
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, _first_interrupt_stops(stop))
    try:
        result = train(
            config,
            corpus,
            store_root=home / "artifacts",
            run_dir=run_dir,
            data_dir=home / "data",
            info=info,
            should_stop=stop.is_set,
            show_progress=not args.no_progress and sys.stderr.isatty(),
            profile_steps=args.profile,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        dist.destroy_process_group(info)
    if not info.is_main:
        return EXIT_OK
    if args.profile:
        _report_profile(result.profile_trace, result.profiled_steps)
    if result.stopped == "cancelled":
        print(f"stopped at step {result.steps}; resume with: resume=true log_dir={run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    print(f"trained {config.model_name} ({result.stopped}, {result.steps} steps): {metrics}", file=sys.stderr)
    print(f"run folder: {run_dir}", file=sys.stderr)
    print(result.model_id)
    return EXIT_OK


def _report_profile(trace: Path | None, steps: int) -> None:
    if trace is None:
        print("profiler: the run ended before any step was recorded; no trace", file=sys.stderr)
        return
    print(f"profiler trace ({steps} steps): {trace}\n"
          f"  open it in chrome://tracing or https://ui.perfetto.dev, or `tensorboard --logdir {trace.parent}` "
          f"(torch-tb-profiler plugin); top ops: {trace.parent / trace.name.split('.')[0]}.summary.txt",
          file=sys.stderr)  # fmt: skip


def _first_interrupt_stops(stop: threading.Event):
    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping at the next step (Ctrl-C again to abort)", file=sys.stderr)
        stop.set()

    return handler


def _serve(argv: list[str], env: Mapping[str, str]) -> int:
    from jobs.metrics import JobMetrics, serve_metrics
    from jobs.queue import JobQueue
    from protos import trainer_pb2_grpc
    from rpc.server import serve_from_args, serve_until_signalled
    from trainer.service import SERVICE_NAME, TrainerService
    from trainer.worker import TrainerPaths, run_workers

    args = _serve_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    redis_url = args.redis_url or env.get("TINYLM_REDIS_URL")
    if not redis_url:
        print("trainer serve: --redis-url or TINYLM_REDIS_URL is required", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 0 or (args.tls_cert is None) != (args.tls_key is None):
        print("trainer serve: --workers must be >= 0; give --tls-cert and --tls-key together", file=sys.stderr)
        return EXIT_USAGE
    paths = TrainerPaths(home=tinylm_home(env), default_corpus=env.get("TINYLM_CORPUS") or None)
    queue = JobQueue(redis_url)
    server = serve_from_args(
        [(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerService(queue, paths.store_root))],
        [SERVICE_NAME],
        args,
        token=args.token or env.get("TINYLM_TOKEN"),
    )
    stop = threading.Event()
    metrics = JobMetrics(queue) if args.metrics_port is not None else None
    workers = run_workers(
        JobQueue(redis_url), paths, args.workers, stop, on_finished=metrics.observe if metrics else None
    )
    print(f"TrainerService listening on {server.address} ({args.workers} worker(s), home {paths.home})", flush=True)
    metrics_server = serve_metrics(metrics.registry, args.host, args.metrics_port) if metrics else None
    if metrics_server:
        print(f"metrics on {metrics_server.url}", flush=True)
    serve_until_signalled(server, workers, stop, drain_s=60.0)
    if metrics_server:
        metrics_server.stop()
    queue.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
