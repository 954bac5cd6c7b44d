"""`./tinylm demo`: the whole pipeline on Tiny Shakespeare, through Redis and gRPC, as a user would run it.

1. the stack: redis-server and the trainer, exporter and bench services (`./tinylm up`);
2. one chained job: train (the `tiny` preset briefly on CPU, `shakespeare-char` in full on a GPU) → export
   (ONNX fp32/INT8/INT4, CoreML, HF, with the parity gates) → bench (quick suites), each enqueued by its parent;
3. the inference service on the new model, and a generation streamed to this terminal;
4. report.md with the figures and plots; then everything the demo made, with where it went.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

from protos import bench_pb2, bench_pb2_grpc, common_pb2, exporter_pb2_grpc, inference_pb2, inference_pb2_grpc
from protos import jobs_pb2, trainer_pb2, trainer_pb2_grpc
from rpc.client import channel
from tools import stack
from tools.generate import stream_generation
from tools.settings import Settings

__all__ = ["main"]

FINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}


def _say(line: str) -> None:
    print(f"\n== {line}", flush=True)


def _watch(watch_call, job_id: str, what: str) -> jobs_pb2.JobEvent:
    """Prints a job's progress events as they come (every 2 s at most); returns the final event."""
    last_print = 0.0
    for event in watch_call(trainer_pb2.WatchRequest(job_id=job_id, from_start=True)):
        now = time.monotonic()
        final = event.state in FINAL
        if final or now - last_print >= 2.0:
            pct = f"{100 * event.progress:5.1f}% " if event.progress >= 0 else ""
            print(f"  [{what}] {pct}{event.message}", flush=True)
            last_print = now
        if final:
            return event
    raise RuntimeError(f"{what} job {job_id}: the event stream ended before a final state")


def _wait_child(get_call, job_id: str, timeout_s: float = 60) -> str:
    """The id of the job that `job_id` enqueued when it finished."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = get_call(trainer_pb2.GetJobRequest(job_id=job_id))
        if status.child_ids:
            return status.child_ids[0]
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} enqueued no follow-up job within {timeout_s:.0f} s")


def _finished(watch_call, get_call, job_id: str, what: str) -> dict:
    """Watches a job to its end; returns its result, or raises with its error."""
    _watch(watch_call, job_id, what)
    return _check(get_call(trainer_pb2.GetJobRequest(job_id=job_id)), what)


def _check(status: jobs_pb2.JobStatus, what: str) -> dict:
    if status.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{what} job {status.job.id} ended {jobs_pb2.JobState.Name(status.state)}: {status.error}")
    return json.loads(status.result_json or "{}")


def _train_spec(args: argparse.Namespace, gpu: bool, results: Path) -> jobs_pb2.TrainSpec:
    bench = jobs_pb2.BenchSpec(suites=args.bench_suites.split(","), quick=True, output_dir=str(results))
    export = jobs_pb2.ExportSpec(formats=args.formats.split(","), then_bench=bench)
    preset = args.preset or ("shakespeare-char" if gpu else "tiny")
    spec = jobs_pb2.TrainSpec(
        preset=preset,
        tokenizer="char",
        device="auto",
        model_name=f"demo-{preset}",
        max_steps=args.max_steps if args.max_steps else (0 if gpu else 600),
        then_export=export,
    )
    if not gpu:
        spec.eval_interval = 100
    return spec


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    gpu = torch.cuda.is_available()
    results = (settings.home / "demo" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    results.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    _say(f"1/4 the stack (TINYLM_HOME={settings.home})")
    state = stack.start_stack(settings, only=["trainer", "exporter", "bench"])
    for name, proc in state["processes"].items():
        print(f"  {name:<9} {proc.get('address', state['redis_url'])}  (log {proc['log']})")
    try:
        addresses = {n: p["address"] for n, p in state["processes"].items() if "address" in p}
        with (
            channel(addresses["trainer"]) as t_ch,
            channel(addresses["exporter"]) as e_ch,
            channel(addresses["bench"]) as b_ch,
        ):
            trainer = trainer_pb2_grpc.TrainerServiceStub(t_ch)
            exporter = exporter_pb2_grpc.ExporterServiceStub(e_ch)
            bench = bench_pb2_grpc.BenchServiceStub(b_ch)

            spec = _train_spec(args, gpu, results)
            _say(f"2/4 train {spec.preset} on {'GPU' if gpu else 'CPU'} -> export -> bench, chained through Redis")
            job = trainer.StartTraining(trainer_pb2.StartTrainingRequest(spec=spec)).job_id
            trained = _finished(trainer.WatchTraining, trainer.GetTraining, job, "train")
            model_id = trained["model_id"]
            print(f"  model {model_id}: {json.dumps(trained.get('metrics', {}))}")

            export_job = _wait_child(trainer.GetTraining, job)
            report = _finished(exporter.WatchExport, exporter.GetExport, export_job, "export")
            _print_parity(report)

            _say("3/4 serve the model and stream a generation")
            address = stack.add_service(settings, "inference", model=model_id)
            print(f"  inference {address}")
            # The engine ends a sequence at the context length: ask for no more than fits after the prompt.
            context = json.loads((settings.artifacts / model_id / "config.json").read_text())["block_size"]
            with channel(address) as i_ch:
                stub = inference_pb2_grpc.InferenceServiceStub(i_ch)
                prompt_ids = stub.Tokenize(inference_pb2.TokenizeRequest(text=args.prompt)).token_ids
                tokens = max(1, min(args.tokens, context - len(prompt_ids)))
                params = inference_pb2.SamplingParameters(
                    max_new_tokens=tokens, temperature=0.8, has_temperature=True, top_k=40, seed=1337, has_seed=True
                )
                request = inference_pb2.GenerateRequest(
                    model=common_pb2.ModelRef(id=model_id), prompt=args.prompt, params=params
                )
                print("-" * 60 + "\n" + args.prompt, end="", flush=True)
                final = list(stream_generation(stub, request, sys.stdout))[-1]
                print("\n" + "-" * 60)
                t = final.timings
                print(
                    f"  {final.usage.completion_tokens} tokens, TTFT {t.ttft_ms:.1f} ms, {t.mean_inter_token_ms:.2f} ms/token"
                )

            _say("4/4 benchmark and report")
            bench_job = _wait_child(exporter.GetExport, export_job)
            final = _watch(bench.WatchBench, bench_job, "bench")
            if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(
                    f"bench job {bench_job} ended {jobs_pb2.JobState.Name(final.state)}: {final.message}"
                )
            bench_report = bench.GetReport(bench_pb2.GetReportRequest(job_id=bench_job))
    finally:
        if not args.keep_up:
            stack.stop_stack(settings)

    artifact = settings.artifacts / model_id
    _say(f"done in {time.monotonic() - started:.0f} s; where everything went")
    rows = [
        ("model artifact", artifact),
        ("ONNX fp32 / INT8 / INT4", artifact / "onnx"),
        ("CoreML packages", artifact / "coreml"),
        ("Hugging Face format", artifact / "hf"),
        ("parity report", artifact / "parity.json"),
        ("bench results + report.md", Path(bench_report.files[0].path).parent if bench_report.files else results),
        ("service logs", settings.stack_dir / "logs"),
    ]
    for what, path in rows:
        print(f"  {what:<26} {path}{'' if path.exists() else '  (missing)'}")
    print(f"  {'stack':<26} {'still up: ./tinylm down stops it' if args.keep_up else 'stopped'}")
    return 0


def _print_parity(report: dict) -> None:
    """One line per exported variant: size, logit error, greedy agreement, val-loss delta, gate."""
    print(f"  {'variant':<16}{'MB':>7}{'max|dlogits|':>14}{'greedy':>8}{'dval_loss':>11}  gate")
    for name, row in (report.get("variants") or {}).items():
        gate = "pass" if row.get("passed") else "FAIL"
        gate = gate if row.get("gates") else "-"
        cells = [
            f"{row.get('bytes', 0) / 1e6:7.2f}",
            f"{row['max_abs_logits']:14.2e}" if row.get("max_abs_logits") is not None else f"{'-':>14}",
            f"{100 * row['greedy_agreement']:7.1f}%" if row.get("greedy_agreement") is not None else f"{'-':>8}",
            f"{row['val_loss_delta']:+11.4f}" if row.get("val_loss_delta") is not None else f"{'-':>11}",
        ]
        print(f"  {name:<16}{''.join(cells)}  {gate}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tinylm demo", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="", help="model preset (default: tiny on CPU, shakespeare-char on a GPU)")
    p.add_argument(
        "--max-steps", type=int, default=0, help="training steps (default: 600 on CPU, the preset's on a GPU)"
    )
    p.add_argument("--formats", default="onnx,int8,int4,coreml,hf", help="export formats")
    p.add_argument("--bench-suites", default="kvcache,memory", help="bench suites of the chained bench job")
    p.add_argument("--prompt", default="ROMEO:", help="prompt of the streamed generation")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--keep-up", action="store_true", help="leave the stack running afterwards")
    args = p.parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the stack this demo started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args)
    except (RuntimeError, TimeoutError) as err:
        print(f"\ntinylm demo: {err}", file=sys.stderr)
        return 1
