"""The training benchmark: shakespeare-char to val loss <= 1.474 with our trainer, and the same model in eager PyTorch.

    python -m bench_svc.benches.training                       # on a CUDA machine; writes bench_svc/results/train-<gpu>.*
    python -m bench_svc.benches.training --cpu-smoke --out DIR # a seconds-long run of the same code path on a CPU

Variants, all on nanoGPT's shakespeare-char data, split, model and evaluation: "tinylm" (the preset as it trains:
the whole step one CUDA graph around the torch.compile'd model, our fused residual + LayerNorm kernel inside it, bf16
autocast, fused AdamW, no host sync between log points), "tinylm-nokernels" (the same step without our kernels: the
kernels' end-to-end figure), "tinylm-kernels" (every compiled-step kernel: flash attention too), "tinylm-flash",
"tinylm-ro" (the default before: torch.compile's reduce-overhead CUDA-graph trees, no kernels), "tinylm-graph" (the
eager model captured whole), "tinylm-fast" (the shakespeare-char-fast preset: a schedule cut to the budget),
"tinylm-muon" (the shakespeare-char-muon preset: Muon, a trapezoid schedule, QK-norm, ReLU², untied head; "-hot",
"-long", "-short", "-gpt" try other settings of it; "-fast" is the time-to-loss run: exact whole-split evaluations
every 100 steps; "-60s" the shakespeare-char-60s preset, the best whole-split loss in 60 s: 2,400 steps, the weights'
average evaluated, dropout 0.15 and 10% of the inputs noised), "compile-default" (torch.compile without CUDA graphs),
"eager" (no compile, our kernels), and the anchor "eager-pytorch" (no compile, plain PyTorch: nanoGPT's loop). For each it records the time from launch
(model build, compilation and evaluations included) to the first evaluation at or below the target val loss, the first step's time from launch, the best val loss within the first
60 s, the best weights' loss on the whole val split (every token scored once), the largest difference from the
anchor's val loss at the same evaluations, tokens/s and MFU (median over log intervals after warm-up), and the
val-loss curve. A run goes on to its time budget (or max_steps). `--part startup` measures launch to first step in a
new process with an empty compile cache and again with the cache it left, for the default preset or any variant
(`--startup tinylm-blocks:cold,tinylm-blocks:warm`). Issue 16's compile options have variants of their own:
"-opt" (clipping and the optimizer step compiled too, trainer.optimizer_step), "-blocks" (each transformer Block
compiled on its own, compile_scope=blocks), on reduce-overhead's way and the muon preset; "tinylm-tuned" is
reduce-overhead with Inductor's coordinate-descent tuning of its kernels (compile_mode=reduce-overhead-tuned). With two or more GPUs it also
measures DDP tokens/s of the `medium` preset on 2 GPUs vs 1 (torchrun, the same `trainer.main` code path).
`--startup VARIANT:worker` runs two jobs of a variant back to back in one new process, as the trainer's
worker does (the compiler imported in the background from its start, the second job reusing the first's compiled
code), and reports each job's start to its first step; `--startup VARIANT:run` the whole run in a new process, every
time counted from that process's launch (the time to the target from the launch itself).
Results: CSV + JSON (GPU, commit, command) and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from bench_svc.benches.train_report import REPO_ROOT, fmt, new_figure, run_info, write_csv_json
from bench_svc.provenance import RunInfo, gpu_slug
from trainer.config import ConfigError, TrainConfig, apply_overrides, load_config, parse_overrides
from trainer.corpus import resolve_corpus
from trainer.data import prepare_data
from trainer.distributed import destroy_process_group, dist_from_env
from trainer.evaluate import split_loss
from trainer.train import build_model, resolve_device, train
from trainer.warm_start import preload_for

__all__ = ["VariantResult", "run_variant", "main"]

MODULE = "bench_svc.benches.training"
log = logging.getLogger(MODULE)

NO_GPU_EXIT_CODE = 2
TARGET_VAL_LOSS = 1.474  # nanoGPT's own train.py on shakespeare-char: best 1.4733 (H200, step 1750, 85 s)
WINDOW_S = 60.0  # "best val loss within the first minute"
WARMUP_STEPS = 10  # steps left out of tokens/s (compilation, allocator warm-up)
CSV_COLUMNS = (
    "variant", "gpu", "n_gpus", "preset", "compile", "dtype", "reached_target", "time_to_target_s", "target_val_loss",
    "best_val_loss", "best_val_loss_60s", "best_val_loss_full", "max_eval_diff_vs_anchor", "tokens_per_s", "mfu",
    "steps", "wall_s", "first_step_s", "commit", "command",
)  # fmt: skip
ANCHOR = "eager-pytorch"  # nanoGPT's loop in plain PyTorch: the in-run anchor every variant's curve is compared with


@dataclass
class VariantResult:
    """One benchmarked run. Times are seconds from the variant's launch (before its model is built)."""

    variant: str
    preset: str
    compile: bool
    dtype: str
    n_gpus: int = 1
    target_val_loss: float = TARGET_VAL_LOSS
    reached_target: bool = False
    time_to_target_s: float | None = None
    best_val_loss: float | None = None
    best_val_loss_60s: float | None = None
    best_val_loss_full: float | None = None  # the best weights re-evaluated on the whole val split (trainer.evaluate)
    max_eval_diff_vs_anchor: float | None = None  # largest |val loss - the anchor's| at the evaluations both made
    first_step_s: float | None = None  # launch to the first step's loss (compilation included)
    tokens_per_s: float | None = None
    mfu: float | None = None
    steps: int = 0
    wall_s: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)  # {t, step, val_loss, train_loss} per evaluation


def run_variant(
    name: str,
    config: TrainConfig,
    corpus: Path,
    workdir: Path,
    *,
    target: float,
    budget_s: float,
    warmup_steps: int = WARMUP_STEPS,
    launched_at: float | None = None,
) -> VariantResult:
    """Train `config` until the val loss reaches `target`, `budget_s` passes or max_steps; measure as it goes. Times
    count from `launched_at` (a time.time() before this call: the process's launch) or from this call."""
    out = VariantResult(
        variant=name, preset=config.preset, compile=config.compile, dtype=config.dtype, target_val_loss=target
    )
    tokens_per_s: list[float] = []
    mfus: list[float] = []
    launch = time.perf_counter() - (0.0 if launched_at is None else time.time() - launched_at)

    def on_progress(step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter() - launch
        if out.first_step_s is None:
            out.first_step_s = now
        if "tokens_per_s" in metrics and step > warmup_steps and "val_loss" not in metrics:
            tokens_per_s.append(metrics["tokens_per_s"])
            if "mfu" in metrics:
                mfus.append(metrics["mfu"])
        if "val_loss" in metrics:
            out.curve.append(
                {"t": now, "step": step, "val_loss": metrics["val_loss"], "train_loss": metrics["train_loss"]}
            )
            if metrics["val_loss"] <= target and not out.reached_target:
                out.reached_target, out.time_to_target_s = True, now

    def should_stop() -> bool:  # the run goes on past the target: the best loss within the window is measured too
        return time.perf_counter() - launch > budget_s

    shutil.rmtree(workdir / name, ignore_errors=True)  # a launch repeats a variant's name: no weights of a run before
    result = train(
        config,
        corpus,
        store_root=workdir / "store",
        run_dir=workdir / name,
        data_dir=workdir / "data",
        progress_callback=on_progress,
        should_stop=should_stop,
    )
    out.wall_s = time.perf_counter() - launch
    out.steps = result.steps
    vals = [c["val_loss"] for c in out.curve]
    early = [c["val_loss"] for c in out.curve if c["t"] <= WINDOW_S]
    out.best_val_loss = min(vals) if vals else None
    out.best_val_loss_60s = min(early) if early else None
    out.tokens_per_s = statistics.median(tokens_per_s) if tokens_per_s else None
    out.mfu = statistics.median(mfus) if mfus else None
    best = workdir / name / "best" / "model.safetensors"  # this run's: the folder was emptied before it
    if best.is_file():
        out.best_val_loss_full = _whole_val_loss(config, corpus, workdir, best)
    return out


def _whole_val_loss(config: TrainConfig, corpus: Path, workdir: Path, weights: Path) -> float:
    """The saved best weights' loss on every token of the val split (not the sampled estimate)."""
    data = prepare_data(corpus, config.tokenizer, workdir / "data", bpe_vocab=config.bpe_vocab)
    device = resolve_device(config.device)
    model = build_model(config, data.vocab_size).to(device)
    load_model(model, str(weights), device=str(device))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype, torch.float32)
    return split_loss(model, data.val, model.config.block_size, device, dtype=dtype)


def _variants(args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    """The variants `--variants` names, in its order (all when empty); a bad name -> SystemExit naming the choices."""
    variants = dict(_all_variants(args))
    names = [v.strip() for v in args.variants.split(",") if v.strip()] or list(variants)
    return [(n, variant_config(n, variants)) for n in names]


def variant_config(name: str, variants: dict[str, TrainConfig]) -> TrainConfig:
    """A named variant, or one with TrainConfig keys changed: `tinylm-muon-fast+dropout=0.3+max_steps=2000` (a sweep
    without a new variant in the code; the whole string names its results). Bad name or key -> SystemExit."""
    base, *overrides = name.split("+")
    if base not in variants:
        raise SystemExit(f"{MODULE}: unknown variant {base!r}; choose from {list(variants)} (+key=value to change one)")
    try:
        return apply_overrides(variants[base], parse_overrides(overrides))
    except ConfigError as err:
        raise SystemExit(f"{MODULE}: variant {name!r}: {err}") from None


def gpu_variants(eval_interval: int = 250, max_steps: int = 0) -> dict[str, TrainConfig]:
    """The GPU variants by name (tools.train_probe profiles the same configs)."""
    args = argparse.Namespace(cpu_smoke=False, eval_interval=eval_interval, max_steps=max_steps)
    return dict(_all_variants(args))


def _all_variants(args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    if args.cpu_smoke:
        base = load_config("tiny").replace(
            device="cpu", max_steps=args.max_steps or 40, batch_size=8, block_size=64, eval_interval=10,
            eval_iters=4, log_interval=1, warmup=5, compile_mode="none", tensorboard=False,
        )  # fmt: skip
        # the smoke variants differ where the GPU ones do: compiled vs eager, and another schedule
        steps = args.max_steps or 40
        return [
            ("tinylm", base.replace(compile_mode="default")),
            ("tinylm-fast", base.replace(lr=2 * base.lr, max_steps=steps // 2)),
            ("tinylm-muon", base.replace(optimizer="muon", decay="trapezoid", warmdown_steps=steps // 2, min_lr=0.0)),
            ("eager-pytorch", base.replace(kernels=False)),
        ]
    # log_interval: the loop syncs with the GPU only there; tokens/s is measured over each interval
    base = load_config("shakespeare-char").replace(log_interval=10, eval_interval=args.eval_interval, tensorboard=False)
    if args.max_steps:
        base = base.replace(max_steps=args.max_steps)
    fast = load_config("shakespeare-char-fast").replace(log_interval=10, eval_interval=args.eval_interval,
                                                        tensorboard=False)  # fmt: skip
    muon = load_config("shakespeare-char-muon").replace(log_interval=10, eval_interval=args.eval_interval,
                                                        tensorboard=False)  # fmt: skip
    # The presets step as one CUDA graph around the compiled model with the fused add + norm kernel (step_graph auto,
    # compile_mode default, kernel_names add_norm). `plain`: that step without our kernels; `ro`: the preset's way
    # before (reduce-overhead: torch.compile's CUDA-graph trees, no kernels), which the compile options modify.
    plain = base.replace(kernel_names="")
    ro = plain.replace(compile_mode="reduce-overhead", step_graph=False)
    muon_fast = muon.replace(max_steps=1300, warmdown_steps=650, eval_mode="val-full", eval_interval=100, eval_iters=4,
                             checkpoint_interval=1300)  # fmt: skip
    return [
        ("tinylm", base),  # the preset as it trains by default
        ("tinylm-nokernels", plain),  # the same step, kernels off (the kernels' end-to-end figure: tinylm / this)
        ("tinylm-kernels", plain.replace(kernels=True)),  # every compiled-step kernel: flash attention + add + norm
        ("tinylm-flash", plain.replace(kernel_names="flash_attention")),  # one kernel at a time: flash attention only
        ("tinylm-ro", ro),  # the default before 2026-11-30: reduce-overhead's CUDA-graph trees, no kernels
        ("tinylm-graph", plain.replace(compile_mode="none", step_graph=True)),  # the eager model captured, no compile
        ("tinylm-fast", fast),  # the shakespeare-char-fast preset: the same model, a schedule cut to the budget
        ("tinylm-fast-graph", fast.replace(compile_mode="none", step_graph=True, kernel_names="")),
        ("tinylm-muon", muon),  # the shakespeare-char-muon preset: Muon + trapezoid, QK-norm, ReLU², untied head
        # other settings of it, worth a run each: a hotter shorter schedule; a longer one (if steps fit in 60 s);
        # Muon on nanoGPT's own model (what the optimizer alone gives)
        ("tinylm-muon-hot", muon.replace(muon_lr=0.05, lr=3e-3, max_steps=1500, warmdown_steps=750)),
        ("tinylm-muon-long", muon.replace(max_steps=3000, warmdown_steps=1500)),
        # the preset's best val came at step 1,250 (mid-warmdown) and it overfit after (H200, 352693c): the same
        # recipe with the warmdown ending there
        ("tinylm-muon-short", muon.replace(max_steps=1300, warmdown_steps=650)),
        ("tinylm-muon-gpt", muon.replace(preset="shakespeare-char")),
        # the time-to-loss variant: muon-short with exact evaluations of the whole val split every 100 steps (each
        # ~30x fewer tokens than nanoGPT's 2 x 200 sampled batches, no eval graph to compile) and the resume state
        # saved at the end only (its first try evaluated every 50 steps and saved the resume state each time: ~0.2 s
        # an evaluation, H200, 785a6e6); -ro: the same under reduce-overhead without kernels
        ("tinylm-muon-fast", muon_fast),
        ("tinylm-muon-fast-ro", muon_fast.replace(compile_mode="reduce-overhead", step_graph=False, kernel_names="")),
        # the same evaluated on the weights' moving average (inside the captured step; unmeasured when added): the
        # 60 s whole-split target (1.45) and an earlier crossing of 1.474 are what it is for
        ("tinylm-muon-fast-ema", muon_fast.replace(ema_decay=0.99)),
        ("tinylm-muon-fast-ema995", muon_fast.replace(ema_decay=0.995)),
        # a shorter schedule (five runs crossed 1.474 between steps 1,100 and 1,300); a longer, more regularised one
        # with the average for the 60 s whole-split target (the recipe overfits after ~1,300 steps at dropout 0.2)
        ("tinylm-muon-fast-1100", muon_fast.replace(max_steps=1100, warmdown_steps=550, checkpoint_interval=1100)),
        (
            "tinylm-muon-ema-long",
            muon_fast.replace(
                max_steps=2400, warmdown_steps=1200, checkpoint_interval=2400, dropout=0.25, ema_decay=0.995
            ),
        ),  # fmt: skip
        # the shakespeare-char-60s preset: ema-long at dropout 0.15 with 10% of the inputs noised (unigram draws)
        ("tinylm-muon-60s", load_config("shakespeare-char-60s").replace(log_interval=10, tensorboard=False)),
        # issue 16's compile options, each against the way it modifies (reduce-overhead): the clipping and optimizer
        # step compiled (CUDA graphs under reduce-overhead), each Block compiled on its own (a shorter compile, maybe a
        # slower step)
        ("tinylm-tuned", ro.replace(compile_mode="reduce-overhead-tuned")),  # + coordinate-descent kernel tuning
        ("tinylm-opt", ro.replace(compile_optimizer=True)),
        ("tinylm-blocks", ro.replace(compile_scope="blocks")),
        ("tinylm-opt-blocks", ro.replace(compile_optimizer=True, compile_scope="blocks")),
        ("tinylm-muon-blocks", muon.replace(compile_scope="blocks")),
        ("compile-default", ro.replace(compile_mode="default")),  # torch.compile without CUDA graphs of any kind
        ("eager", plain.replace(compile_mode="none", step_graph=False, kernels=True)),  # eager PyTorch, our kernels
        # the anchor: nanoGPT's eager loop in plain PyTorch
        ("eager-pytorch", plain.replace(compile_mode="none", step_graph=False, kernels=False)),
    ]


def _compare_with_anchor(results: list[VariantResult]) -> None:
    """max |val loss - the anchor's| over the evaluations both runs made, for every variant of the same schedule."""
    anchor = next((r for r in results if r.variant == ANCHOR), None)
    if anchor is None:
        return
    at = {c["step"]: c["val_loss"] for c in anchor.curve}
    for r in results:
        common = [abs(c["val_loss"] - at[c["step"]]) for c in r.curve if c["step"] in at]
        if common and r.variant != ANCHOR and not _own_schedule(r.variant):  # another schedule: not comparable
            r.max_eval_diff_vs_anchor = max(common)


def _own_schedule(variant: str) -> bool:
    """Whether the variant trains on a schedule of its own (its curve is not comparable with the anchor's)."""
    return "-fast" in variant or "-muon" in variant


STARTUP_KINDS = ("cold", "warm", "worker", "run")
WORKER_JOBS = 2  # jobs a VARIANT:worker start-up run trains back to back
_STARTUP_SHORT = {"cold": ("tinylm", "cold"), "warm": ("tinylm", "warm"), "graph": ("tinylm-graph", "warm")}


def startup_runs(spec: str, variants: dict[str, TrainConfig]) -> list[tuple[str, str, str]]:
    """`--startup` -> (result name, variant, kind) per entry, in order. An entry is VARIANT:cold (an empty compile
    cache of the variant's own), VARIANT:warm (the cache its earlier launches left), VARIANT:worker (two jobs in one
    process, on the cache as it is) or VARIANT:run (the whole benchmarked run in a new process, on the cache its earlier
    launches left: time to the target from the launch itself), or a short name: cold and warm (the default preset,
    tinylm), graph (tinylm-graph, which compiles nothing). Bad entries -> SystemExit."""
    runs = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        if entry in _STARTUP_SHORT:
            variant, kind = _STARTUP_SHORT[entry]
            runs.append((f"startup-{entry}", variant, kind))
            continue
        variant, _, kind = entry.rpartition(":")
        if kind not in STARTUP_KINDS:
            raise SystemExit(
                f"{MODULE}: bad --startup entry {entry!r}: give cold, warm, graph or VARIANT:KIND with KIND one of "
                f"{list(STARTUP_KINDS)}"
            )
        variant_config(variant, variants)  # a bad variant name or key=value -> SystemExit naming the choices
        runs.append((f"startup-{variant}-{kind}", variant, kind))
    return runs


def _startup(args: argparse.Namespace, workdir: Path, target: float) -> list[VariantResult]:
    """Launch to first step of a variant in a new process: with an empty compile cache (cold), or with the cache an
    earlier launch of it left (warm: Inductor's FX-graph, AOTAutograd and autotuning caches, Triton's kernels); or
    (worker) each of two jobs' start to its first step in one process; or (run) the whole run, timed from the launch."""
    if args.cpu_smoke:
        return []
    variants = dict(_all_variants(args))
    results = []
    for name, variant, kind in startup_runs(args.startup, variants):
        cache = workdir / f"compile-cache-{variant}"
        if kind == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        out_json = workdir / f"{name}.json"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TORCHINDUCTOR_CACHE_DIR=str(cache),
                   TRITON_CACHE_DIR=str(cache / "triton"), TINYLM_BENCH_LAUNCH=repr(time.time()))  # fmt: skip
        cmd = [sys.executable, "-m", MODULE, "--startup-worker", str(out_json), "--startup-variant", variant,
               "--workdir", str(workdir), "--eval-interval", str(args.eval_interval)]  # fmt: skip
        if kind == "worker":
            cmd += ["--startup-jobs", str(WORKER_JOBS)]
        if kind == "run":
            cmd += ["--startup-run", "--budget-s", str(args.budget_s), "--target", str(target)]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env)
        doc = json.loads(out_json.read_text())
        config = variant_config(variant, variants)
        if kind == "run":
            results.append(VariantResult(**{**doc, "variant": f"launch-{variant}"}))
            log.info("%s: first step %s s, val <= %s at %s s from launch", name, doc["first_step_s"], target,
                     doc["time_to_target_s"])  # fmt: skip
            continue
        firsts = [(name, doc["first_step_s"])] if kind != "worker" else [
            (f"{name}-job{i + 1}", job["first_step_s"]) for i, job in enumerate(doc["jobs"])
        ]  # fmt: skip
        for result_name, first in firsts:
            log.info("%s: %.1f s from %s to the first step", result_name, first,
                     "the job's start" if kind == "worker" else "launch")  # fmt: skip
            results.append(VariantResult(variant=result_name, preset=config.preset, compile=config.compile,
                                         dtype=config.dtype, first_step_s=first))  # fmt: skip
    return results


def startup_config(config: TrainConfig) -> TrainConfig:
    """A variant's config cut to two steps, every one logged, no evaluation; the same compiled graphs (the schedule's
    length is kept: a trapezoid's warmdown must fit)."""
    return config.replace(max_steps=2, decay_steps=config.lr_decay_steps, log_interval=1, eval_interval=1000,
                          tensorboard=False)  # fmt: skip


def _startup_worker(args: argparse.Namespace) -> int:
    """One startup measurement: the seconds from the parent's launch time to this process's first step; with
    --startup-jobs N, N runs back to back as the trainer's worker runs jobs, each timed from its own start."""
    launch = float(os.environ["TINYLM_BENCH_LAUNCH"])
    started = time.time() - launch  # interpreter start and imports
    full = variant_config(args.startup_variant, dict(_all_variants(args)))
    config = full if args.startup_run else startup_config(full)
    preload_for(config)  # as trainer.main and the worker do: CUDA's driver and the compiler overlap the set-up
    workdir = Path(args.workdir)
    corpus = resolve_corpus(os.environ.get("TINYLM_CORPUS"), workdir / "data")
    if args.startup_run:  # the benchmarked run itself, every time counted from the launch
        target = TARGET_VAL_LOSS if args.target is None else args.target
        out = run_variant(args.startup_variant, config, corpus, workdir, target=target, budget_s=args.budget_s,
                          launched_at=launch)  # fmt: skip
        Path(args.startup_worker).write_text(json.dumps(dataclasses.asdict(out)))
        log.info("run of %s from launch (%.1f s to main): %s", args.startup_variant, started,
                 {k: v for k, v in dataclasses.asdict(out).items() if k != "curve"})  # fmt: skip
        return 0
    jobs, startups = [], []  # each job's timings; trainer.train's own start-up metrics of each
    for _ in range(args.startup_jobs):
        begun, firsts = time.time(), []
        result = train(config, corpus, store_root=workdir / "startup-store", data_dir=workdir / "data",
                       run_dir=workdir / f"startup-{time.time_ns()}",
                       progress_callback=lambda step, m: firsts.append(time.time()))  # fmt: skip
        startups.append(result.startup)
        jobs.append({"first_step_s": firsts[0] - begun, "since_launch_s": firsts[0] - launch,
                     "reused": result.compiled_code_reused, **result.startup})  # fmt: skip
        log.info("start-up of %s, run %d: %s", args.startup_variant, len(jobs), jobs[-1])
    aot = dict(torch._dynamo.utils.counters["aot_autograd"])  # a warm launch should show autograd_cache_hit only
    # which of Inductor's caches a warm launch hit (fxgraph_cache_hit, Triton bundler and autotune counters, ...)
    caches = {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if k != "extern_calls"}
    doc = {"first_step_s": jobs[0]["since_launch_s"], "jobs": jobs, "aot_autograd": aot, "inductor_counters": caches,
           "started_s": started, **_compile_counters()}  # fmt: skip
    Path(args.startup_worker).write_text(json.dumps(doc))
    log.info(
        "start-up of %s: %.1f s to main (interpreter, imports), %.1f s to the first step (in train(): %s); "
        "AOTAutograd cache %s; Inductor %s; %s; compile phases:\n%s",
        args.startup_variant,
        started,
        doc["first_step_s"],
        {k: round(v, 2) for k, v in startups[0].items()},
        aot,
        caches,
        _compile_counters(),
        torch._dynamo.utils.compile_times(repr="str"),
    )
    return 0


def _compile_counters() -> dict[str, Any]:
    """What dynamo and Inductor did in this process: graphs compiled, recompilations' frames, CUDA-graph skips and
    recordings (a compiled optimizer step whose graph is skipped or re-recorded every step would show here)."""
    counters = torch._dynamo.utils.counters
    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "frames_ok": counters["frames"]["ok"],
        "inductor": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k},
    }


def _ddp_scaling(args: argparse.Namespace, workdir: Path) -> list[VariantResult]:
    """tokens/s of `medium` on 1 and 2 GPUs through torchrun; [] with fewer than 2 GPUs."""
    if args.cpu_smoke or torch.cuda.device_count() < 2:
        log.info(
            "DDP scaling skipped: needs 2 CUDA GPUs (have %d)", torch.cuda.device_count() if not args.cpu_smoke else 0
        )
        return []
    results = []
    for n in (1, 2):
        out_json = workdir / f"ddp-{n}.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", MODULE, "--ddp-worker", str(out_json), "--ddp-steps", str(args.ddp_steps),
            "--workdir", str(workdir / f"ddp-{n}"),
        ]  # fmt: skip
        log.info("running %s", shlex.join(cmd))
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        results.append(VariantResult(**json.loads(out_json.read_text())))
    return results


def _ddp_worker(args: argparse.Namespace) -> int:
    """One torchrun rank: a short `medium` run; rank 0 writes its VariantResult as JSON."""
    info = dist_from_env(os.environ)
    config = load_config("medium").replace(
        max_steps=args.ddp_steps, eval_interval=args.ddp_steps, eval_iters=2, log_interval=1, tensorboard=False
    )
    workdir = Path(args.workdir)
    corpus = resolve_corpus(os.environ.get("TINYLM_CORPUS"), workdir / "data")
    rates: list[float] = []

    def on_progress(step: int, metrics: dict[str, float]) -> None:
        if step > WARMUP_STEPS and "val_loss" not in metrics:
            rates.append(metrics["tokens_per_s"])

    launch = time.perf_counter()
    result = train(
        config, corpus, store_root=workdir / "store", run_dir=workdir / "run", data_dir=workdir / "data", info=info,
        progress_callback=on_progress,
    )  # fmt: skip
    if info.is_main:
        out = VariantResult(
            variant=f"ddp-{info.world_size}gpu", preset="medium", compile=config.compile, dtype=config.dtype,
            n_gpus=info.world_size, steps=result.steps, wall_s=time.perf_counter() - launch,
            tokens_per_s=statistics.median(rates) if rates else None, best_val_loss=result.metrics.get("val_loss"),
        )  # fmt: skip
        Path(args.ddp_worker).write_text(json.dumps(dataclasses.asdict(out)))
    destroy_process_group(info)
    return 0


def write_results(
    results: list[VariantResult], info: RunInfo, out_dir: Path, budget_s: float, *, suffix: str = ""
) -> list[Path]:
    """train-<gpu><suffix>.csv (a row per variant), .json (all of it, curves too), .png (when matplotlib is there)."""
    stem = out_dir / f"train-{gpu_slug(info.gpu)}{suffix}"
    rows = [{**dataclasses.asdict(r), "gpu": info.gpu, "commit": info.commit, "command": info.command} for r in results]
    doc = {"info": dataclasses.asdict(info), "budget_s": budget_s, "window_s": WINDOW_S,
           "results": [dataclasses.asdict(r) for r in results]}  # fmt: skip
    paths = write_csv_json(stem, CSV_COLUMNS, rows, doc)
    png = _plot(results, info, stem.with_suffix(".png"))
    return paths + ([png] if png else [])


def _plot(results: list[VariantResult], info: RunInfo, path: Path) -> Path | None:
    fig = new_figure(12, 5)
    if fig is None:
        return None
    curves, rates = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r in results:
        if r.curve:
            curves.plot([c["t"] for c in r.curve], [c["val_loss"] for c in r.curve], "o-", label=r.variant)
    target = results[0].target_val_loss if results else TARGET_VAL_LOSS
    curves.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target}")
    curves.axvline(WINDOW_S, color="gray", ls=":", lw=0.8, label=f"{WINDOW_S:.0f} s")
    curves.set(xlabel="seconds from launch", ylabel="val loss (nats/char)", title="time to target")
    curves.grid(alpha=0.3)
    curves.legend()
    measured = [r for r in results if r.tokens_per_s]
    rates.barh([r.variant for r in measured], [r.tokens_per_s for r in measured])
    rates.set(xlabel="tokens / s (median after warm-up)", title="throughput")
    fig.suptitle(f"training, {info.gpu}, {info.commit[:12]}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def format_table(results: list[VariantResult]) -> str:
    lines = [f"{'variant':<16} {'1st step':>8} {'target s':>8} {'best60s':>8} {'best':>7} {'whole':>7} "
             f"{'dAnchor':>7} {'tok/s':>11} {'MFU':>5} {'steps':>6}"]  # fmt: skip
    for r in results:
        mfu = None if r.mfu is None else 100 * r.mfu
        lines.append(
            f"{r.variant:<16} {fmt(r.first_step_s, '.1f'):>8} {fmt(r.time_to_target_s, '.1f'):>8} "
            f"{fmt(r.best_val_loss_60s, '.4f'):>8} {fmt(r.best_val_loss, '.4f'):>7} {fmt(r.best_val_loss_full, '.4f'):>7} "
            f"{fmt(r.max_eval_diff_vs_anchor, '.4f'):>7} {fmt(r.tokens_per_s, ',.0f'):>11} {fmt(mfu, '.1f'):>5} {r.steps:>6}"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_svc" / "results", help="results folder")
    p.add_argument("--workdir", type=Path, help="scratch folder for runs and data (default: a temporary one)")
    p.add_argument("--target", type=float, default=None, help=f"target val loss (default {TARGET_VAL_LOSS}; smoke 3.0)")
    p.add_argument("--budget-s", type=float, default=240.0, help="longest a variant may run, in seconds")
    p.add_argument("--max-steps", type=int, default=0, help="override the preset's max_steps (0: keep)")
    p.add_argument("--eval-interval", type=int, default=250, help="steps between evaluations (nanoGPT: 250)")
    p.add_argument("--ddp-steps", type=int, default=60, help="steps of each DDP scaling run")
    p.add_argument(
        "--part",
        choices=("all", "speed", "startup", "ddp"),
        default="all",
        help="speed: the shakespeare-char variants; startup: cold vs warm compile to the first step; "
        "ddp: the medium 1-vs-2-GPU scaling (default all)",
    )
    p.add_argument(
        "--variants",
        default="",
        help="comma-separated variants to run, in this order (default all: tinylm, tinylm-graph, tinylm-fast, "
        "tinylm-fast-graph, tinylm-muon, tinylm-muon-hot, tinylm-muon-long, tinylm-muon-short, tinylm-muon-gpt, "
        "tinylm-tuned, tinylm-opt, "
        "tinylm-blocks, tinylm-opt-blocks, tinylm-muon-blocks, "
        "compile-default, eager, eager-pytorch); "
        "one alone rules out state left by an earlier variant in the same process",
    )
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny CPU run of the same code path (for tests)")
    p.add_argument("--startup-worker", help=argparse.SUPPRESS)  # internal: one startup measurement, writes JSON here
    p.add_argument("--startup-variant", default="tinylm", help=argparse.SUPPRESS)  # internal: the worker's variant
    p.add_argument("--startup-jobs", type=int, default=1, help=argparse.SUPPRESS)  # internal: runs in the worker
    p.add_argument("--startup-run", action="store_true", help=argparse.SUPPRESS)  # internal: the whole run, timed
    p.add_argument(
        "--startup",
        default="cold,warm,graph",
        help="start-up runs, in order: VARIANT:cold (an empty compile cache), VARIANT:warm (the cache the variant's "
        "earlier launch left), VARIANT:worker (two jobs in one process, as the trainer's worker runs them, each "
        "timed from its start), VARIANT:run (the whole run in a new process on the cache earlier launches left: "
        "time to the target from the launch); cold, warm: the default preset (tinylm); graph: tinylm-graph (no compile)",
    )
    p.add_argument("--tag", default="", help="file name tag: train-<gpu>[-part][-TAG].* (a partial run beside a whole)")
    p.add_argument("--ddp-worker", help=argparse.SUPPRESS)  # internal: one torchrun rank, writes JSON here
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.ddp_worker:
        return _ddp_worker(args)
    if args.startup_worker:
        return _startup_worker(args)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            f"{MODULE} needs a CUDA GPU (torch.cuda.is_available() is False here); "
            "use --cpu-smoke for a tiny CPU run of the same code path.",
            file=sys.stderr,
        )
        return NO_GPU_EXIT_CODE
    if args.part in ("all", "startup") and not args.cpu_smoke:
        startup_runs(args.startup, dict(_all_variants(args)))  # a bad entry fails now, not at the end
    target = args.target if args.target is not None else (3.0 if args.cpu_smoke else TARGET_VAL_LOSS)
    info = run_info(torch.device("cpu" if args.cpu_smoke else "cuda"), MODULE, argv)
    if args.cpu_smoke:
        info = dataclasses.replace(info, gpu="cpu")
    suffix = ("" if args.part == "all" else f"-{args.part}") + (f"-{args.tag}" if args.tag else "")
    with tempfile.TemporaryDirectory(prefix="tinylm-train-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        corpus = resolve_corpus(os.environ.get("TINYLM_CORPUS"), workdir / "data")
        results = []
        for name, config in _variants(args) if args.part in ("all", "speed") else []:
            prepare_data(corpus, config.tokenizer, workdir / "data", bpe_vocab=config.bpe_vocab)  # not timed
            log.info("variant %s: %s", name, config)
            warmup = 2 if args.cpu_smoke else WARMUP_STEPS
            torch._dynamo.utils.counters.clear()
            results.append(
                run_variant(name, config, corpus, workdir, target=target, budget_s=args.budget_s, warmup_steps=warmup)
            )
            log.info("variant %s compiled: %s", name, _compile_counters())
            write_results(results, info, args.out, args.budget_s, suffix=suffix)  # a run cut short keeps these
        _compare_with_anchor(results)
        if args.part in ("all", "startup"):
            results += _startup(args, workdir, target)
        if args.part in ("all", "ddp"):
            results += _ddp_scaling(args, workdir)
    paths = write_results(results, info, args.out, args.budget_s, suffix=suffix)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
