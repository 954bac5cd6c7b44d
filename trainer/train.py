"""The training loop, nanoGPT's train.py as a library: `train(config, corpus, ...) -> TrainResult`.

One optimizer step = `accum` micro-steps of `micro` sequences on each of W ranks (trainer.config.micro_batch_plan):
forward under autocast, backward (DDP syncs gradients on the last micro-step only), unscale, clip (the norm
before clipping is logged every step), AdamW step with the scheduled learning rate and, when annealed, the
scheduled dropout. The model may run under torch.compile (`compile_mode`) and recompute its blocks' activations
in backward (`grad_checkpointing`); `profile_steps` records a torch.profiler trace. Every `eval_interval`
steps: train/val loss and perplexity on fixed windows, the best weights kept in `<run_dir>/best/`, the exact
resume state written to `<run_dir>/resume/`, early stopping checked. At the end the best weights become an
artifact in the store. `should_stop()` is polled before every step: the run then saves its resume state and
returns; the best checkpoint so far stays in the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel as DDP

from model.artifact import save_artifact
from model.layers import use_kernels
from model.presets import get_preset
from model.transformer import GPT
from trainer import distributed as dist
from trainer.compile_cache import cache_friendly
from trainer.config import CUDA_GRAPH_MODES, ConfigError, TrainConfig, micro_batch_plan
from trainer.data import BatchLoader, TokenData, WindowSampler, prepare_data
from trainer.distributed import SINGLE, DistInfo
from trainer.dropout_schedule import dropout_at, dropout_levels
from trainer.evaluate import split_loss
from trainer.lr_schedule import learning_rate
from trainer.muon import Muon, MuonAdamW, is_hidden_matrix
from trainer.mfu import Throughput, peak_flops
from trainer.optimizer_step import CompiledOptimizerStep, prepare_optimizer, set_lr
from trainer.resume_state import (
    capture_rng,
    has_resume_state,
    load_extra_tensors,
    load_resume_state,
    save_resume_state,
)
from trainer.run_log import RunLog, plot_curve
from trainer.step_graph import StepGraph, step_graph_problems
from trainer.step_profiler import StepProfiler
from trainer.warm_start import CompilerPreload, before_run, preload_compiler, started_preload, wait_cuda_preload

__all__ = [
    "TrainResult", "ProgressCallback", "train", "resolve_device", "build_model", "artifact_copy", "make_optimizer", "set_lr",
]  # fmt: skip

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, dict[str, float]], None]
Optimizer = torch.optim.Optimizer | MuonAdamW
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VAL_FULL_BATCH = 128  # windows per forward of an eval_mode=val-full evaluation (shakespeare-char's val: 436 windows)


@dataclass
class TrainResult:
    """What a run produced. `stopped` is "completed", "early_stop" or "cancelled"."""

    run_dir: Path
    stopped: str
    steps: int  # optimizer steps done, counting those before a resume
    model_id: str | None = None  # artifact id (None when cancelled or nothing was evaluated)
    metrics: dict[str, float] = field(default_factory=dict)  # best val loss, perplexity, tokens, time
    losses: list[float] = field(default_factory=list)  # training loss of each step this process ran
    grad_norms: list[float] = field(default_factory=list)  # gradient norm before clipping, each step
    profile_trace: Path | None = None  # the torch.profiler trace, when profile_steps asked for one
    profiled_steps: int = 0  # steps the trace holds
    compiled_code_reused: bool = False  # the process's compiled code from the run before was kept for this one
    startup: dict[str, float] = field(default_factory=dict)  # the start-up timings (`_train`), also in `metrics`


def resolve_device(name: str, info: DistInfo = SINGLE) -> torch.device:
    """`auto` -> the GPU of this rank when there is one, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{info.local_rank}"
    return torch.device(name)


def build_model(config: TrainConfig, vocab_size: int) -> GPT:
    """The preset's model at the tokenizer's vocabulary, with the run's block size and dropout (an annealed run's
    model is built with its starting dropout); gradient checkpointing as the run asks."""
    overrides: dict[str, Any] = {"vocab_size": vocab_size}
    if config.block_size:
        overrides["block_size"] = config.block_size
    dropout = config.dropout_start if config.anneals_dropout else config.dropout
    if dropout is not None:
        overrides["dropout"] = dropout
    model = GPT(get_preset(config.preset, **overrides))
    model.gradient_checkpointing = config.grad_checkpointing
    return model


def artifact_copy(model: GPT, weights: Path | None = None) -> GPT:
    """A float32 CPU copy of `model` in eval mode, for saving; `model` itself is left as it is. `weights`: a
    safetensors file of the model's weights (the run's best) to fill the copy from instead of `model`'s own.

    The live model must not be moved: `model.to("cpu")` swaps every parameter's storage in place, and compiled code a
    process keeps for its next run of the same shape (trainer.warm_start.CompiledReuse), with its CUDA-graph trees,
    still holds those Parameter objects. On the H200 a later compiled run failed recording its backward's graph with
    one of the model's 100 parameters as the offending kernel argument, which Triton's check reported as a CPU tensor
    ("Pointer argument (at 1) cannot be accessed from Triton (cpu tensor?)"; "CUDA driver error: invalid argument"
    with torch's static launcher): the in-place move is what puts a parameter on the CPU (trainer/PERF_NOTES.md
    section 15; the fix is yet to run on the GPU)."""
    with torch.random.fork_rng(devices=[]):  # its throwaway initialisation leaves the process's RNG as it was
        copy = GPT(model.config)  # built as GPT builds itself: float32, tied weights one tensor
    if weights is not None:
        load_model(copy, str(weights), device="cpu")
    else:
        copy.load_state_dict({name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()})
    return copy.eval()


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> Optimizer:
    """AdamW with weight decay on matrices (embeddings, linears) only, as nanoGPT; fused kernels on CUDA. With
    optimizer=muon, the blocks' 2-D matrices go to Muon (trainer.muon) instead. Every group records its `base_lr`
    (`assign_base_lr`): the schedule scales it (`set_lr`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if config.optimizer == "muon" and is_hidden_matrix(n, p)]
    taken = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    optimizer: Optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, fused=fused
    )
    if config.optimizer == "muon":
        if not hidden:
            raise ConfigError("optimizer", "optimizer=muon found no 2-D matrices in the model's blocks to train")
        muon = Muon(hidden, lr=config.muon_lr, momentum=config.muon_momentum, weight_decay=config.muon_weight_decay)
        optimizer = MuonAdamW(optimizer, muon)
    assign_base_lr(optimizer, config)
    return optimizer


def assign_base_lr(optimizer: Optimizer, config: TrainConfig) -> None:
    """Each group's `base_lr` from the config: muon_lr for Muon's, lr for AdamW's. Also after a resume, whose saved
    groups would otherwise bring back the learning rates of the run that saved them."""
    muon_groups = optimizer.optimizers[1].param_groups if isinstance(optimizer, MuonAdamW) else []
    for group in optimizer.param_groups:
        group["base_lr"] = config.muon_lr if any(group is g for g in muon_groups) else config.lr


@dataclass
class _Run:
    """The pieces of one run that every helper below needs."""

    config: TrainConfig
    info: DistInfo
    device: torch.device
    data: TokenData
    model: GPT  # the plain module: state dicts, checkpoints, artifact
    fwd: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped `model`
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    sampler: WindowSampler
    train_batches: BatchLoader
    val_batches: BatchLoader
    micro: int
    accum: int
    run_dir: Path
    graph: StepGraph | None = None  # the captured whole step, when config.step_graph
    optimizer_step: CompiledOptimizerStep | None = None  # clipping + the optimizer step, when config.compile_optimizer
    step: int = 0
    best_val: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    # the best weights not yet on disk (config.checkpoint_interval): device copies of the parameters, written at the
    # next checkpoint or when the loop ends
    unsaved_best: list[torch.Tensor] | None = None
    ema: list[torch.Tensor] | None = None  # the weights' moving average, one tensor per parameter (config.ema_decay)
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training time before this process, from the resume state
    startup: dict[str, float] = field(default_factory=dict)  # start-up timings (seconds), see `_train`

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _DTYPES[self.config.dtype]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def train(config: TrainConfig, corpus: Path, *, started_at: float | None = None, **kwargs: Any) -> TrainResult:
    """Train `config` on `corpus` (arguments of `_train`), with `kernels/` on or off as `config.kernels` says.

    `started_at` (a time.perf_counter() value: the process's launch, a job's dequeue) is where the start-up timings
    in the metrics count from; default: now. A compiled run imports torch's compiler on a background thread while it
    sets up (trainer.warm_start; an entry point may have started that already); any run waits for such an import to
    end before its optimizer."""
    started_at = time.perf_counter() if started_at is None else started_at
    preload = preload_compiler() if config.compile or config.compile_optimizer else started_preload()
    # another compiled shape before (a worker's job, a benchmark's variant): its code and CUDA-graph trees go first
    reused = before_run(config)
    with kernel_scope(config), _restores_backend_settings():
        return _train(config, corpus, started_at=started_at, preload=preload, reused=reused, **kwargs)


def kernel_scope(config: TrainConfig) -> contextlib.AbstractContextManager:
    """`model.layers.use_kernels` as `config.kernels` and `config.kernel_names` say (a run, or a probe of its step)."""
    every_kernel, named = config.kernel_switches
    return use_kernels(every_kernel, **named)


@contextlib.contextmanager
def _restores_backend_settings() -> Iterator[None]:
    """Leave torch's process-wide backend settings as the run found them: a worker trains many jobs in one process,
    and one run must not change how the next computes. (A torch.compile run in torch 2.11 reorders SDPA's backend
    priorities to put cuDNN first; the run itself sets TF32.)"""
    cuda = torch.backends.cuda
    flags = (
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
    )
    priority = torch._C._get_sdp_priority_order() if hasattr(torch._C, "_get_sdp_priority_order") else None
    tf32 = (cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        cuda.enable_flash_sdp(flags[0])
        cuda.enable_mem_efficient_sdp(flags[1])
        cuda.enable_math_sdp(flags[2])
        cuda.enable_cudnn_sdp(flags[3])
        if priority is not None:
            torch._C._set_sdp_priority_order(priority)
        cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _train(
    config: TrainConfig,
    corpus: Path,
    *,
    store_root: Path,
    run_dir: Path,
    data_dir: Path,
    info: DistInfo = SINGLE,
    progress_callback: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_progress: bool = False,
    parent_id: str | None = None,
    profile_steps: int = 0,
    started_at: float,
    preload: CompilerPreload | None = None,
    reused: bool = False,
) -> TrainResult:
    """Train `config` on `corpus`; the best weights become an artifact under `store_root` (rank 0 writes files).

    `progress_callback(step, metrics)` is called on rank 0 every `log_interval` steps and after every evaluation;
    `should_stop()` is polled before each step. `data_dir` caches the tokenized corpus. `profile_steps` > 0 writes
    a torch.profiler trace of that many steps (after trainer.step_profiler's warm-up) under `<run_dir>/profile/`.

    Start-up timings, in the first reported interval's metrics (callback, TensorBoard) and `TrainResult.metrics`:
    `setup_s` (from `started_at` to data, model and optimizer ready), `compiler_wait_s` (of which waiting for the compiler's
    background import), `startup_s` (from `started_at` to the first step's launch done: its compilation, its CUDA
    graphs' warm-up; on a GPU its kernels may still run), `compiler_import_s` (the background import's own length).
    `reused`: train() found the previous run's compiled code kept for this one (TrainResult.compiled_code_reused).
    """
    device = resolve_device(config.device, info)
    cuda_init_s = None
    if device.type == "cuda":
        cuda_wait_s = wait_cuda_preload()  # the driver's part, begun by the entry point (GIL free while waiting)
        t0 = time.perf_counter()
        torch.cuda.set_device(device)  # initialises torch's CUDA in a new process, with the GIL held
        cuda_init_s = time.perf_counter() - t0
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dist.init_process_group(info, device)
    run = _setup(config, corpus, run_dir, data_dir, info, device, preload=preload)
    run.startup["setup_s"] = time.perf_counter() - started_at
    if cuda_init_s is not None:  # parts of setup_s, beside the compiler's background import
        run.startup["cuda_init_s"], run.startup["cuda_preload_wait_s"] = cuda_init_s, cuda_wait_s
    result = TrainResult(run_dir=Path(run_dir), stopped="completed", steps=run.step, compiled_code_reused=reused)
    run_log = RunLog(run.run_dir, resume_step=run.step, tensorboard=config.tensorboard) if info.is_main else None
    meter = Throughput(run.model.config, peak_flops(device, config.dtype), world_size=info.world_size)
    bar = _progress_bar(config.max_steps, run.step, show_progress and info.is_main)
    profiler = None
    if profile_steps:
        profiler = StepProfiler(run.run_dir / "profile", profile_steps, device=device, worker_name=f"rank{info.rank}")
    scope = contextlib.ExitStack()  # closed when the loop ends, not after publishing
    start = time.perf_counter()
    try:
        scope.enter_context(_recompile_room(config))
        if config.compile:
            scope.enter_context(cache_friendly())  # a warm launch loads AOTAutograd's cache (trainer.compile_cache)
        if run.optimizer_step is not None:
            scope.callback(run.optimizer_step.release)  # the next run in this process compiles its own step
        if profiler is not None:
            scope.enter_context(profiler)
        pending = _Pending(device)

        def report(wait: bool = False) -> dict[str, float]:
            """Hand every interval that has reached the host to the run log and the callback; the latest metrics."""
            metrics: dict[str, float] = {}
            for interval in pending.received(wait):
                metrics = _interval_metrics(run, result, interval, meter, bar, start)
                if interval.step % config.log_interval == 0 or interval.step == config.max_steps:
                    if run_log is not None:
                        run_log.write(interval.step, "train", metrics)
                    if progress_callback is not None and info.is_main:
                        progress_callback(interval.step, metrics)
            return metrics

        while run.step < config.max_steps:
            report()
            # Polled before every step; with several ranks only right after a log point, since agreeing on it is a
            # collective (a host sync), which the loop makes only there.
            if info.enabled:
                stop = not pending.steps and dist.any_true(bool(should_stop and should_stop()), info, device)
            else:
                stop = bool(should_stop and should_stop())
            if stop:
                result.stopped = "cancelled"
                break
            out = _train_step(run)
            if "startup_s" not in run.startup:
                _record_startup(run, started_at, preload)
            if profiler is not None:
                profiler.step()
            run.step += 1
            run.tokens_seen += config.batch_size * run.model.config.block_size
            pending.add(out)
            log_now = run.step % config.log_interval == 0 or run.step == config.max_steps
            eval_now = run.step % config.eval_interval == 0 or run.step == config.max_steps
            if log_now or eval_now:
                pending.send(run.step)
            if eval_now:
                metrics = report(wait=True)
                if _evaluate_and_checkpoint(run, run_log, progress_callback, metrics):
                    result.stopped = "early_stop"
                    break
                pending.restart()
        pending.send(run.step)  # steps since the last log point (a cancel)
        report(wait=True)
        scope.close()  # writes the profiler trace
        _flush_best(run)  # best weights kept on the device since the last checkpoint
        run.elapsed_s += time.perf_counter() - start
        if result.stopped == "cancelled" and run.step > 0:
            _save_resume(run)  # the step boundary is consistent: resuming continues exactly here
        result.steps = run.step
        result.metrics, result.startup = {**_final_metrics(run), **run.startup}, dict(run.startup)
        if profiler is not None:
            result.profile_trace, result.profiled_steps = profiler.trace, profiler.recorded_steps
        if info.is_main and result.stopped != "cancelled" and (run.run_dir / "best").is_dir():
            result.model_id = _publish(run, store_root, parent_id, result.metrics)
    finally:
        scope.close()
        if bar is not None:
            bar.close()
        if run_log is not None:
            run_log.close()
            plot_curve(run_log.path, run.run_dir / "curve.png", title=f"{config.model_name} ({config.preset})")
    return result


def _interval_metrics(
    run: _Run, result: TrainResult, interval: _Interval, meter: Throughput, bar: Any, start: float
) -> dict[str, float]:
    """Record an interval's per-step numbers in `result` and the meter; the metrics of its last step, as the
    callback and the run log see them."""
    values = interval.values.tolist()
    losses, norms = values[0::2], values[1::2]
    first = not result.losses  # this interval holds the process's first step: its metrics carry the start-up
    result.losses += losses
    result.grad_norms += norms
    last = interval.last
    metrics = {"loss": losses[-1], "lr": last.lr, "grad_norm": norms[-1], "dropout": last.dropout}
    metrics.update(meter.update(run.config.batch_size, interval.seconds_per_step()))
    metrics["elapsed_s"] = run.elapsed_s + time.perf_counter() - start
    metrics["eta_s"] = meter.eta_s(run.config.max_steps - interval.step)
    if first:
        metrics.update(run.startup)
    if bar is not None:
        bar.set_postfix_str(meter.describe(losses[-1]), refresh=False)
        bar.update(len(losses))
    return metrics


def _record_startup(run: _Run, started_at: float, preload: CompilerPreload | None) -> None:
    """The first step has returned: note how long the launch took to get here."""
    run.startup["startup_s"] = time.perf_counter() - started_at
    if preload is not None and preload.import_s is not None:
        run.startup["compiler_import_s"] = preload.import_s
    s = run.startup
    imported = f"{s['compiler_import_s']:.2f} s" if "compiler_import_s" in s else "nothing"
    log.info("start-up: first step %.2f s after launch (setup %.2f s, of which %.2f s waiting for the compiler's "
             "import and %s initialising CUDA; that import took %s in the background)", s["startup_s"], s["setup_s"],
             s.get("compiler_wait_s", 0.0), f"{s['cuda_init_s']:.2f} s" if "cuda_init_s" in s else "no time",
             imported)  # fmt: skip


def _recompile_room(config: TrainConfig) -> contextlib.AbstractContextManager:
    """Under torch.compile, let dynamo keep a graph per annealed dropout level, in training and in eval mode."""
    levels = dropout_levels(config) if config.anneals_dropout and config.compile else 0
    if not levels:
        return contextlib.nullcontext()
    dynamo_config = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return dynamo_config.patch({name: max(getattr(dynamo_config, name), 2 * levels + 2)})


def _setup(
    config: TrainConfig,
    corpus: Path,
    run_dir: Path,
    data_dir: Path,
    info: DistInfo,
    device: torch.device,
    *,
    preload: CompilerPreload | None = None,
) -> _Run:
    """Data, model, optimizer, sampler; restored from the resume state when `config.resume` and there is one.
    `preload`: the compiler's background import, waited for before the optimizer (its first use of the compiler)."""
    if info.is_main:  # rank 0 tokenizes; the others then find it in the cache
        data = prepare_data(corpus, config.tokenizer, data_dir, bpe_vocab=config.bpe_vocab)
    dist.barrier(info)
    if not info.is_main:
        data = prepare_data(corpus, config.tokenizer, data_dir, bpe_vocab=config.bpe_vocab)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, data.vocab_size).to(device)
    block = model.config.block_size
    compiler_wait_s = preload.wait() if preload is not None else 0.0  # no two threads import the compiler at once
    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")
    micro, accum = micro_batch_plan(config.batch_size, config.grad_accum, info.world_size)
    sampler = WindowSampler(len(data.train), block, config.seed)
    WindowSampler(len(data.val), block, config.seed)  # fail now, not at the first evaluation, if val is too short
    run = _Run(
        config,
        info,
        device,
        data,
        model,
        model,
        optimizer,
        scaler,
        sampler,
        BatchLoader(data.train, block, device),
        BatchLoader(data.val, block, device),
        micro,
        accum,
        Path(run_dir),
    )
    if preload is not None:
        run.startup["compiler_wait_s"] = compiler_wait_s
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if config.ema_decay:
        run.ema = [p.detach().clone() for p in model.parameters()]  # the average starts at the initial weights
    if config.resume and has_resume_state(run.run_dir):
        _restore(run)
        log.info("resumed %s at step %d", run.run_dir, run.step)
    else:
        torch.manual_seed(config.seed + info.rank)  # dropout differs between ranks, as nanoGPT's seed offset
        np.random.seed((config.seed + info.rank) % 2**32)
    capture = _captures_step(config, device, info, accum)
    run.fwd = _compiled_forward(model, config)
    if capture:  # the captured step calls the compiled model where there is one (compile_mode default)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        autocast = None if config.dtype == "float32" else _DTYPES[config.dtype]
        after = (lambda: _ema_update(run)) if run.ema is not None else None  # captured with the step
        run.graph = StepGraph(model, optimizer, autocast, max_norm, forward=run.fwd, after_step=after)
    if info.enabled:
        run.fwd = DDP(run.fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile_optimizer:
        prepare_optimizer(optimizer, device)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        kwargs = compile_kwargs(config) if config.compile else {}
        params = [p for p in model.parameters() if p.requires_grad]
        run.optimizer_step = CompiledOptimizerStep(params, optimizer, max_norm, lambda fn: torch.compile(fn, **kwargs))
    return run


def _captures_step(config: TrainConfig, device: torch.device, info: DistInfo, accum: int) -> bool:
    """Whether the whole step runs as one CUDA graph: step_graph=true (else ConfigError naming why it cannot), or
    auto where nothing rules it out (the log says which)."""
    if config.step_graph is False:
        return False
    problems = step_graph_problems(config, device, info.world_size, accum)
    if config.step_graph is True:
        if problems:
            raise ConfigError("step_graph", "step_graph=true needs: " + "; ".join(problems))
        return True
    if problems:
        log.info("step_graph=auto: the step is not captured (it would need: %s)", "; ".join(problems))
    else:
        log.info("step_graph=auto: the whole step is captured as one CUDA graph")
    return not problems


def compile_kwargs(config: TrainConfig) -> dict[str, Any]:
    """torch.compile's `mode` (or, for reduce-overhead-tuned, its `options`: the two cannot be given together) for
    config.compile_mode (not "none")."""
    if config.compile_mode == "reduce-overhead-tuned":
        return {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
    return {"mode": None if config.compile_mode == "default" else config.compile_mode}


def _compiled_forward(model: GPT, config: TrainConfig) -> torch.nn.Module:
    """What the step calls: `model`, compiled whole (compile_scope=model: one graph, torch.compile's wrapper) or
    block by block in place (compile_scope=blocks: `model` itself, each Block's forward compiled; they share one
    code object, so dynamo traces one block and every layer reuses its graph), or eager."""
    if not config.compile:
        return model
    if config.compile_scope == "blocks":
        for block in model.blocks:
            block.compile(**compile_kwargs(config))
        return model
    return torch.compile(model, **compile_kwargs(config))


@dataclass
class _StepOut:
    """One optimizer step's numbers; loss and grad_norm stay on the device until the loop next syncs."""

    loss: torch.Tensor  # () mean over the global batch
    grad_norm: torch.Tensor  # () before clipping
    lr: float
    dropout: float


def _train_step(run: _Run) -> _StepOut:
    """One optimizer step. Nothing here waits for the GPU: the CPU runs on to the next step's launches."""
    config, info = run.config, run.info
    lr = learning_rate(run.step, config)
    dropout = run.model.config.dropout
    offsets = run.sampler.next_offsets(config.batch_size)  # (batch_size,) the same on every rank
    if run.graph is not None:  # one process, one micro-step, dropout fixed (step_graph_problems)
        x, y = _train_batch(run, offsets, 0)
        with torch.profiler.record_function("step_graph"):
            loss, grad_norm = run.graph.step(x, y, lr / config.lr)
        return _StepOut(loss, grad_norm, lr, dropout)
    set_lr(run.optimizer, lr / config.lr)
    if config.anneals_dropout:
        dropout = dropout_at(run.step, config)
        run.model.set_dropout(dropout)
    loss_sum = torch.zeros((), device=run.device)
    for m in range(run.accum):
        first = (m * info.world_size + info.rank) * run.micro
        x, y = _train_batch(run, offsets[first : first + run.micro], first)  # (micro, T)
        if isinstance(run.fwd, DDP):
            run.fwd.require_backward_grad_sync = m == run.accum - 1  # all-reduce once, on the last micro-step
        with run.autocast(), torch.profiler.record_function("forward"):
            _, loss = _forward(run, run.fwd, x, y)
            loss = loss / run.accum  # the mean over the micro-steps, as one big batch would give
        with torch.profiler.record_function("backward"):
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    with torch.profiler.record_function("optimizer"):
        if run.optimizer_step is not None:  # compiled clip + step (no loss scaler: config refuses float16)
            grad_norm = run.optimizer_step.step()
        else:
            run.scaler.unscale_(run.optimizer)
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)  # the norm before clipping
            run.scaler.step(run.optimizer)
            run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            _ema_update(run)
    return _StepOut(dist.all_mean(loss_sum, info), grad_norm.detach(), lr, dropout)


def _train_batch(run: _Run, offsets: np.ndarray, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training inputs and targets for window starts `offsets`, the inputs noised when config.input_noise (the
    draws seeded by the run's seed, the step and the rows' place in the global batch: the same after a resume)."""
    x, y = run.train_batches(offsets)
    if run.config.input_noise > 0:
        seed = (run.config.seed * 1_000_003 + run.step) * 65_537 + first
        x = run.train_batches.noised(x, run.config.input_noise, seed % 2**63)
    return x, y


def _params(run: _Run) -> list[torch.Tensor]:
    """The model's parameters (each once: tied weights are one parameter), detached views of their memory."""
    return [p.detach() for p in run.model.parameters()]


@torch.no_grad()
def _ema_update(run: _Run) -> None:
    """ema = decay * ema + (1 - decay) * weights: one multi-tensor launch (a CUDA-graph-safe scalar weight)."""
    torch._foreach_lerp_(run.ema, _params(run), 1.0 - run.config.ema_decay)


@contextlib.contextmanager
def _holding(run: _Run, weights: list[torch.Tensor] | None) -> Iterator[None]:
    """The model holds `weights` (one tensor per parameter; None: nothing changes) inside, copied in place, so a
    captured step and the compiled model keep reading the same memory; the training weights come back after."""
    if weights is None:
        yield
        return
    with torch.no_grad():
        params = _params(run)
        live = [p.clone() for p in params]
        torch._foreach_copy_(params, weights)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, live)


Mark = Any  # a point in the run's time: a recorded CUDA event on a GPU, the host clock (perf_counter) on a CPU


@dataclass
class _Interval:
    """The numbers of the steps up to a log point, on their way to the host."""

    step: int  # the log point's step
    last: _StepOut
    values: torch.Tensor  # (2n,) loss, grad norm of each step; pinned host memory on a GPU
    start: Mark  # the interval's start
    end: Mark  # recorded after the copy to the host

    def done(self, wait: bool = False) -> bool:
        """Whether the values have reached the host (on a CPU they are there already); `wait`: block until they have."""
        if isinstance(self.end, float):
            return True
        if wait:
            self.end.synchronize()
        return self.end.query()

    def seconds_per_step(self) -> float:
        """Wall time per step over the interval (once `done`)."""
        n = len(self.values) // 2
        if isinstance(self.end, float):
            return (self.end - self.start) / n
        return self.start.elapsed_time(self.end) / 1e3 / n


class _Pending:
    """Steps run since the last log point: their losses and norms wait on the device. At a log point they go to the
    host in one copy; on a GPU the copy is asynchronous (pinned memory and an event) and is read once the event has
    completed, so the loop never drains the GPU's queue to report (nanoGPT reads its loss every log_interval steps;
    here the read costs no wait). Evaluations and the end of the run wait for it."""

    def __init__(self, device: torch.device) -> None:
        self.steps: list[_StepOut] = []
        self.cuda = device.type == "cuda"
        self.in_flight: list[_Interval] = []  # oldest first
        self.restart()

    def _mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, out: _StepOut) -> None:
        self.steps.append(out)

    def send(self, step: int) -> None:
        """Start reading the steps since the last log point (no wait on a GPU)."""
        if not self.steps:
            return
        values = torch.stack([v for s in self.steps for v in (s.loss.float(), s.grad_norm.float())])  # (2n,)
        if self.cuda:
            values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True).copy_(values, non_blocking=True)
        end = self._mark()
        self.in_flight.append(_Interval(step, self.steps[-1], values, self.start, end))
        self.steps, self.start = [], end

    def received(self, wait: bool = False) -> list[_Interval]:
        """The intervals whose numbers have reached the host (all of them when `wait`), oldest first."""
        done = []
        while self.in_flight and self.in_flight[0].done(wait):
            done.append(self.in_flight.pop(0))
        return done

    def restart(self) -> None:
        """Start the clock of the next interval (after an evaluation, so it is not counted as training time)."""
        self.start = self._mark()


def _forward(run: _Run, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """module(x, y); under reduce-overhead, first tell CUDA-graph trees that a new iteration begins (so a replay
    may reuse the previous one's output buffers, which the caller has consumed by then)."""
    if run.config.compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
    return module(x, y)


@torch.no_grad()
def estimate_loss(run: _Run) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, on the same windows every time (a fixed generator); with
    eval_mode=val-full, the val loss over every token of the split instead, both by the eager model."""
    config, info = run.config, run.info
    block = run.model.config.block_size
    evaluator = run.fwd.module if isinstance(run.fwd, DDP) else run.fwd
    splits = [("train", run.data.train, run.train_batches), ("val", run.data.val, run.val_batches)]
    out = {}
    if config.eval_mode == "val-full":  # every rank scores the whole split: the same number everywhere
        evaluator, splits = run.model, splits[:1]
        dtype = _DTYPES.get(config.dtype, torch.float32)
        out["val_loss"] = split_loss(run.model, run.data.val, block, run.device, batch_size=VAL_FULL_BATCH, dtype=dtype)
    run.model.eval()
    for split, tokens, batches in splits:
        rng = np.random.Generator(np.random.PCG64([config.seed, 1]))
        high = len(tokens) - block
        losses = torch.zeros(config.eval_iters, device=run.device)
        for k in range(config.eval_iters):
            offsets = rng.integers(0, high, size=run.micro * info.world_size, dtype=np.int64)
            x, y = batches(offsets[info.rank * run.micro : (info.rank + 1) * run.micro])
            with run.autocast():
                _, loss = evaluator(x, y) if evaluator is run.model else _forward(run, evaluator, x, y)
            losses[k] = loss.float()
        out[f"{split}_loss"] = float(dist.all_mean(losses.mean(), info))
    run.model.train()
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    return out


def _evaluate_and_checkpoint(
    run: _Run, run_log: RunLog | None, callback: ProgressCallback | None, step_metrics: dict[str, float]
) -> bool:
    """Evaluate; keep the best weights; save the resume state. Returns True when early stopping says stop."""
    with _holding(run, run.ema):  # evaluations and the best weights are the weights' average where there is one
        metrics = estimate_loss(run)
        metrics["elapsed_s"] = step_metrics["elapsed_s"]
        improved = metrics["val_loss"] < run.best_val
        every = run.config.checkpoint_interval
        checkpoint = not every or run.step % every == 0
        if improved:
            run.best_val, run.best_step, run.bad_evals = metrics["val_loss"], run.step, 0
            if run.info.is_main:
                _keep_best(run, write=checkpoint)
        else:
            run.bad_evals += 1
    metrics["best_val_loss"] = run.best_val
    log.info("step %d: train %.4f, val %.4f%s", run.step, metrics["train_loss"], metrics["val_loss"],
             " (best)" if improved else "")  # fmt: skip
    if run_log is not None:
        run_log.write(run.step, "eval", metrics)
    if callback is not None and run.info.is_main:
        callback(run.step, {**step_metrics, **metrics})  # the step's numbers too, so one event tells it all
    if checkpoint:
        _flush_best(run)
        _save_resume(run, elapsed_s=step_metrics["elapsed_s"])
    patience = run.config.early_stop_patience
    return bool(patience and run.bad_evals >= patience)


@torch.no_grad()
def _keep_best(run: _Run, write: bool) -> None:
    """The model's weights are the best so far: written now, or (checkpoint_interval, between checkpoints) kept in a
    device copy until the next checkpoint or the loop's end (a copy costs microseconds, a file ~0.1 s)."""
    if write:
        run.unsaved_best = None
        _save_best(run)
        return
    if run.unsaved_best is None:
        run.unsaved_best = [p.clone() for p in _params(run)]
    else:
        torch._foreach_copy_(run.unsaved_best, _params(run))


def _save_best(run: _Run) -> None:
    """Write the model's weights as the run's best (atomically: a reader never sees half a file)."""
    best = run.run_dir / "best"
    best.mkdir(exist_ok=True)
    tmp = best / "model.safetensors.tmp"
    save_model(run.model, str(tmp))
    tmp.replace(best / "model.safetensors")


def _flush_best(run: _Run) -> None:
    """Write the best weights kept on the device (checkpoint_interval), if any, held by the model for the write."""
    if run.unsaved_best is None:
        return
    with _holding(run, run.unsaved_best):
        _save_best(run)
    run.unsaved_best = None


def _save_resume(run: _Run, elapsed_s: float | None = None) -> None:
    rngs = dist.gather(capture_rng(run.device), run.info)
    if run.info.is_main:
        state = {
            "step": run.step,
            "best_val": run.best_val if math.isfinite(run.best_val) else None,
            "best_step": run.best_step,
            "bad_evals": run.bad_evals,
            "tokens_seen": run.tokens_seen,
            "elapsed_s": run.elapsed_s if elapsed_s is None else elapsed_s,
            "world_size": run.info.world_size,
            "sampler": run.sampler.state_dict(),
            "config": run.config.to_dict(),
        }
        extra = {f"ema.{i}": t for i, t in enumerate(run.ema)} if run.ema is not None else None
        save_resume_state(run.run_dir, run.model, run.optimizer, run.scaler, state, rngs, extra=extra)
    dist.barrier(run.info)


def _restore(run: _Run) -> None:
    state = load_resume_state(run.run_dir, run.model, run.optimizer, run.scaler, rank=run.info.rank, device=run.device)
    assign_base_lr(run.optimizer, run.config)
    run.step = int(state["step"])
    run.best_val = math.inf if state["best_val"] is None else float(state["best_val"])
    run.best_step, run.bad_evals = int(state["best_step"]), int(state["bad_evals"])
    run.tokens_seen, run.elapsed_s = int(state["tokens_seen"]), float(state["elapsed_s"])
    run.sampler.load_state_dict(state["sampler"])
    if run.ema is not None:
        saved = load_extra_tensors(run.run_dir, run.device) or {}
        keys = [f"ema.{i}" for i in range(len(run.ema))]
        if all(k in saved for k in keys):
            with torch.no_grad():
                torch._foreach_copy_(run.ema, [saved[k] for k in keys])
        else:  # the run was saved without an average (ema_decay was 0 then): it starts from the restored weights
            log.warning("the resume state in %s has no weight average: it restarts from the restored weights",
                        run.run_dir)  # fmt: skip
            with torch.no_grad():
                torch._foreach_copy_(run.ema, _params(run))
    if state["world_size"] != run.info.world_size:
        log.warning(
            "resuming a %d-rank run on %d ranks: dropout RNG restarts", state["world_size"], run.info.world_size
        )


def _final_metrics(run: _Run) -> dict[str, float]:
    metrics = {"steps": float(run.step), "tokens": float(run.tokens_seen), "train_time_s": run.elapsed_s}
    if math.isfinite(run.best_val):
        metrics.update(val_loss=run.best_val, val_ppl=math.exp(min(run.best_val, 50.0)), best_step=float(run.best_step))
    return metrics


def _publish(run: _Run, store_root: Path, parent_id: str | None, metrics: dict[str, float]) -> str:
    """The best weights as an artifact, read from their file straight into a CPU copy (`artifact_copy`); the live
    model is not touched."""
    return save_artifact(
        Path(store_root),
        artifact_copy(run.model, run.run_dir / "best" / "model.safetensors"),
        run.data.tokenizer,
        name=run.config.model_name,
        preset=run.config.preset,
        metrics=metrics,
        parent_id=parent_id,
    )


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
