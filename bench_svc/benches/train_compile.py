"""torch.compile modes for training: steps/s after warm-up and compile time of each, with eager as the anchor.

    python -m bench_svc.benches.train_compile          # CUDA: shakespeare-char as its preset trains; CPU: tiny, 8 x 64, fp32
    python -m bench_svc.benches.train_compile --modes none,default --steps 10 --threads 1 --out DIR

Each mode ('none' is eager) trains in a process of its own through the trainer itself (`trainer.train.train` with
`compile_mode=<mode>`), with empty Inductor and Triton caches, so compilation is measured cold. The first step
carries the compilation: `compile_s` = first step - median step. `steps_per_s` is 1 / the median step time over
`--steps` steps after `--warmup-steps` (reduce-overhead records its CUDA graphs during those). A run is cancelled
after its timed steps, so no evaluation graph is compiled. Dynamo and Inductor counters say what a mode really
did: on a CPU, reduce-overhead has no CUDA graphs to capture (`cudagraph_skips`) and max-autotune has few GEMM
templates to tune, so both mostly run as 'default' there. Eager runs first and again last: on a shared machine the
two show how much the load drifted during the run, and speed-ups are against their mean.
Results: `bench_svc/results/compile-modes-<device>.csv|json|png` (device, commit, command) and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench_svc.benches.train_report import REPO_ROOT, device_slug, fmt, new_figure, run_info, run_worker, write_results
from bench_svc.provenance import RunInfo
from model.presets import get_preset
from trainer.config import COMPILE_MODES, DTYPES, TrainConfig, load_config
from trainer.corpus import resolve_corpus
from trainer.data import prepare_data
from trainer.train import resolve_device, train

__all__ = ["measure_mode", "main"]

MODULE = "bench_svc.benches.train_compile"
log = logging.getLogger(MODULE)

CPU_PRESET, CPU_BATCH = "tiny", 8  # seconds per mode on a CPU, compilation aside
GPU_PRESET = "shakespeare-char"
CSV_COLUMNS = (
    "mode", "order", "device", "status", "preset", "batch_size", "block_size", "dtype", "first_step_s", "compile_s",
    "step_s", "step_s_min", "steps_per_s", "tokens_per_s", "speedup_vs_eager", "graphs", "cudagraph_skips", "wall_s",
    "commit", "command",
)  # fmt: skip


def measure_mode(config: TrainConfig, corpus: Path, workdir: Path, *, warmup_steps: int, steps: int) -> dict[str, Any]:
    """Train `config` for warmup_steps + steps steps and time them (call it in a fresh process per mode)."""
    from torch._dynamo.utils import counters

    step_s: list[float] = []

    def on_progress(step: int, metrics: dict[str, float]) -> None:
        if "val_loss" not in metrics:
            step_s.append(metrics["step_s"])

    total = warmup_steps + steps
    config = config.replace(
        max_steps=total + 1, eval_interval=total + 1, log_interval=1, tensorboard=False, resume=False
    )  # cancelled after `total` steps: no evaluation, no artifact
    launch = time.perf_counter()
    train(
        config, corpus, store_root=workdir / "store", run_dir=workdir / f"run-{config.compile_mode}",
        data_dir=workdir / "data", progress_callback=on_progress, should_stop=lambda: len(step_s) >= total,
    )  # fmt: skip
    wall = time.perf_counter() - launch
    timed = step_s[warmup_steps:]
    median = statistics.median(timed)
    block = config.block_size or get_preset(config.preset).block_size
    inductor = {k: v for k, v in counters["inductor"].items() if v}
    return {
        "mode": config.compile_mode,
        "status": "ok",
        "preset": config.preset,
        "batch_size": config.batch_size,
        "block_size": block,
        "dtype": config.dtype,
        "first_step_s": step_s[0],
        "compile_s": max(0.0, step_s[0] - median) if config.compile else 0.0,
        "step_s": median,
        "step_s_min": min(timed),  # on a shared machine noise only adds: the fastest step is the steadiest figure
        "steps_per_s": 1.0 / median,
        "tokens_per_s": config.batch_size * block / median,
        "threads": torch.get_num_threads(),
        "graphs": counters["stats"]["unique_graphs"],
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "wall_s": wall,
        "step_times_s": step_s,
        "inductor_counters": inductor,
    }


def _config(args: argparse.Namespace, mode: str) -> TrainConfig:
    cuda = resolve_device(args.device).type == "cuda"
    preset = args.preset or (GPU_PRESET if cuda else CPU_PRESET)
    base = load_config(preset)
    return base.replace(
        device=args.device, compile_mode=mode, grad_accum=1, step_graph=False, kernel_names="",  # the mode alone
        batch_size=args.batch_size or (base.batch_size if cuda else CPU_BATCH),
        block_size=args.block_size or base.block_size or 0,
        dtype=args.dtype or (base.dtype if cuda else "float32"),
    )  # fmt: skip


def _run_mode(args: argparse.Namespace, mode: str, corpus: Path, workdir: Path) -> dict[str, Any]:
    """One mode in a fresh process with empty compiler caches; a failure or timeout becomes a row saying so."""
    out = workdir / f"{mode}.json"
    flags = ["--worker", mode, "--result", str(out), "--corpus", str(corpus), "--workdir", str(workdir),
             *_shared_flags(args)]  # fmt: skip
    caches = workdir / f"cache-{mode}"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")}
    launch = time.perf_counter()
    try:
        return run_worker(MODULE, flags, out, env=env, timeout_s=args.timeout_s)
    except subprocess.TimeoutExpired:
        status = f"timeout after {args.timeout_s:.0f} s"
    except subprocess.CalledProcessError as err:
        status = f"failed (exit {err.returncode})"
    log.warning("mode %s: %s", mode, status)
    config = _config(args, mode)
    return {"mode": mode, "status": status, "preset": config.preset, "batch_size": config.batch_size,
            "block_size": config.block_size, "dtype": config.dtype, "wall_s": time.perf_counter() - launch}  # fmt: skip


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
             "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps),
             "--threads", str(args.threads)]  # fmt: skip
    flags += ["--preset", args.preset] if args.preset else []
    return flags + (["--dtype", args.dtype] if args.dtype else [])


def _plot(rows: list[dict[str, Any]], info: RunInfo, path: Path) -> Path | None:
    fig = new_figure(11, 4.5, layout="constrained")
    if fig is None:
        return None
    speed, compile_time = fig.subplots(1, 2, sharey=True)
    names = [f"{r['order']}. {r['mode']}" + ("" if r["status"] == "ok" else f" ({r['status']})") for r in rows]
    rates = [r.get("steps_per_s") or 0.0 for r in rows]
    bars = speed.barh(names, rates, color=["tab:gray" if r["mode"] == "none" else "tab:blue" for r in rows])
    speed.bar_label(bars, labels=[f" {r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
                                  for r in rows])  # fmt: skip
    speed.set_xlim(0, 1.3 * max(rates + [1e-9]))
    speed.set(xlabel="training steps / s after warm-up (median)", title="speed (x eager)")
    speed.invert_yaxis()
    compiles = [r.get("compile_s") or 0.0 for r in rows]
    bars = compile_time.barh(names, compiles, color="tab:orange")
    compile_time.bar_label(bars, labels=[f" {c:.1f} s" for c in compiles])
    compile_time.set_xlim(0, 1.3 * max(compiles + [1e-9]))
    compile_time.set(xlabel="compile time (first step - median step), cold caches", title="compile time")
    r0 = rows[0]
    fig.suptitle(f"torch.compile modes, training {r0['preset']} {r0['batch_size']}x{r0['block_size']} {r0['dtype']}, "
                 f"{info.gpu}, torch {info.torch_version}, {info.commit[:12]}", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120)
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'#':>2} {'mode':<16} {'steps/s':>8} {'x eager':>8} {'compile s':>10} {'graphs':>7}  status"]
    for r in rows:
        lines.append(
            f"{r['order']:>2} {r['mode']:<16} {fmt(r.get('steps_per_s'), '.2f'):>8} "
            f"{fmt(r.get('speedup_vs_eager'), '.2f'):>8} {fmt(r.get('compile_s'), '.1f'):>10} "
            f"{fmt(r.get('graphs'), 'd'):>7}  {r['status']}"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_svc" / "results", help="results folder")
    p.add_argument("--modes", default=",".join(COMPILE_MODES), help="comma-separated compile modes ('none': eager)")
    p.add_argument("--preset", help=f"train preset (default: {GPU_PRESET} on CUDA, {CPU_PRESET} on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument(
        "--batch-size", type=int, default=0, help=f"sequences per step (0: the preset's on CUDA, {CPU_BATCH} on CPU)"
    )
    p.add_argument("--block-size", type=int, default=0, help="context length (0: the preset's)")
    p.add_argument("--dtype", choices=DTYPES, help="autocast dtype (default: the preset's on CUDA, float32 on CPU)")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps before timing (the first one compiles)")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of each run (0: torch's default)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="longest one mode may take, compilation included")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--worker", choices=COMPILE_MODES, help=argparse.SUPPRESS)  # internal: one mode, JSON to --result
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad or not modes:
        p.error(f"--modes must be a comma-separated list of {list(COMPILE_MODES)}, got {args.modes!r}")
    if args.warmup_steps < 1 or args.steps < 1:
        p.error("--warmup-steps and --steps must be >= 1")
    args.modes = ["none"] + [m for m in modes if m != "none"] + ["none"]  # the eager anchor first and last
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.worker:  # one mode, in this process
        if args.threads:
            torch.set_num_threads(args.threads)
        config = _config(args, args.worker)
        row = measure_mode(config, args.corpus, args.workdir, warmup_steps=args.warmup_steps, steps=args.steps)
        args.result.write_text(json.dumps(row))
        return 0
    device = resolve_device(args.device)
    info = run_info(device, MODULE, argv)
    with tempfile.TemporaryDirectory(prefix="tinylm-compile-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        corpus = resolve_corpus(os.environ.get("TINYLM_CORPUS"), workdir / "data")
        config = _config(args, "none")
        prepare_data(corpus, config.tokenizer, workdir / "data", bpe_vocab=config.bpe_vocab)  # once, untimed
        rows = []
        for mode in args.modes:
            log.info("mode %s ...", mode)
            rows.append(_run_mode(args, mode, corpus, workdir))
    anchors = [r["step_s"] for r in rows if r["mode"] == "none" and r.get("step_s")]
    eager = statistics.mean(anchors) if anchors else None
    for order, r in enumerate(rows, start=1):
        r.update(order=order, device=info.gpu, commit=info.commit, command=info.command)
        if eager and r.get("step_s"):
            r["speedup_vs_eager"] = eager / r["step_s"]
    stem = args.out / f"compile-modes-{device_slug(device)}"
    doc = {"info": dataclasses.asdict(info), "warmup_steps": args.warmup_steps, "timed_steps": args.steps,
           "results": rows}  # fmt: skip
    write_results(stem, CSV_COLUMNS, rows, doc, lambda png: _plot(rows, info, png))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
