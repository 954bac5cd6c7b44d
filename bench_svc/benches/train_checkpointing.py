"""Gradient checkpointing's trade: peak memory and step time of one shakespeare-char training step, off and on.

    python -m bench_svc.benches.train_checkpointing          # CUDA: the preset's full batch (64 x 256, bf16); CPU: 16 x 256, fp32
    python -m bench_svc.benches.train_checkpointing --batch-size 8 --out DIR

Each variant runs in a process of its own (a fresh allocator, a fresh peak RSS): the trainer's model and AdamW
(`build_model`, `make_optimizer`, eager, the preset's dropout), a batch of random tokens, one warm-up step (AdamW
allocates its state), one measured step, then a few timed ones. Peak memory of the measured step:
- CUDA: `torch.cuda.max_memory_allocated()`: everything live (weights, AdamW state, gradients, activations).
- CPU: the bytes live when the step begins (weights, AdamW state, the batch; counted) plus the largest running total
  of the torch allocator during the step, as `torch.profiler.profile(profile_memory=True)` records it (the
  "Total Allocated" of its [memory] events; tracemalloc does not see torch's allocations). Also the process's peak
  RSS (`getrusage`), which adds the Python and torch runtime and whatever the allocator keeps.
Results: `bench_svc/results/checkpointing-<device>.csv|json|png` (device, commit, command) and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench_svc.benches.train_report import REPO_ROOT, device_slug, new_figure, run_info, run_worker, write_results
from bench_svc.provenance import RunInfo
from model.presets import get_preset
from model.profile import profile_model
from trainer.config import TrainConfig, load_config
from trainer.train import build_model, make_optimizer, resolve_device

__all__ = ["measure_step", "main"]

MODULE = "bench_svc.benches.train_checkpointing"
log = logging.getLogger(MODULE)

PRESET = "shakespeare-char"
CPU_BATCH = 16  # the full 64 x 256 batch takes minutes a step on 2 CPU cores
MiB = 1 << 20
CSV_COLUMNS = (
    "variant", "device", "preset", "batch_size", "block_size", "dtype", "peak_bytes", "step_peak_bytes",
    "persistent_bytes", "activation_estimate_bytes", "max_rss_bytes", "rss_growth_bytes", "step_s", "commit", "command",
)  # fmt: skip
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure_step(config: TrainConfig, vocab_size: int, *, timed_steps: int = 2) -> dict[str, Any]:
    """Peak memory of one training step (after a warm-up step) and the median time of `timed_steps` more.

    Bytes: `peak_bytes` = `persistent_bytes` (live when the step begins) + `step_peak_bytes` (the most the step
    added on top); `max_rss_bytes` / `rss_growth_bytes`: the process's peak RSS, and how much the steps raised it.
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config, vocab_size).to(device).train()
    optimizer = make_optimizer(model, config, device)
    gen = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, model.config.block_size)
    x = torch.randint(vocab_size, shape, generator=gen).to(device)  # (B, T)
    y = torch.randint(vocab_size, shape, generator=gen).to(device)
    dtype = _DTYPES[config.dtype]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rss_before = _max_rss_bytes()
    step()  # warm-up: AdamW's state, allocator growth, kernel autotuning
    persistent = _bytes([*model.parameters(), x, y]) + _bytes(
        [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        live = torch.cuda.memory_allocated(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
        step_peak, persistent = peak - live, live
    else:
        step_peak = _profiled_cpu_peak(step)
        peak = persistent + step_peak
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    max_rss = _max_rss_bytes()
    estimate = profile_model(model.config, config.batch_size, dtype=config.dtype)["memory"]["activation_bytes"]
    return {
        "variant": "on" if config.grad_checkpointing else "off",
        "preset": config.preset,
        "batch_size": config.batch_size,
        "block_size": model.config.block_size,
        "dtype": config.dtype,
        "peak_bytes": peak,
        "step_peak_bytes": step_peak,
        "persistent_bytes": persistent,
        "activation_estimate_bytes": estimate,  # model.profile's estimate without checkpointing
        "max_rss_bytes": max_rss,
        "rss_growth_bytes": max_rss - rss_before,
        "step_s": statistics.median(times) if times else None,
        "threads": torch.get_num_threads(),
    }


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _profiled_cpu_peak(fn: Any) -> int:
    """The largest running total of CPU allocations (bytes above what was live at the start) while `fn` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="tinylm-ckpt-trace-") as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0  # 0: CPU
    ]
    return max([0, *totals])


def _config(args: argparse.Namespace, on: bool) -> TrainConfig:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    base = load_config(args.preset)
    return base.replace(
        device=args.device, grad_checkpointing=on, grad_accum=1, compile_mode="none", step_graph=False, kernel_names="",
        batch_size=args.batch_size or (base.batch_size if cuda else CPU_BATCH),
        dtype=args.dtype or (base.dtype if cuda else "float32"),
    )  # fmt: skip


def _run_variant(args: argparse.Namespace, on: bool, workdir: Path) -> dict[str, Any]:
    """One variant in a fresh process (its own allocator and peak RSS)."""
    out = workdir / f"{'on' if on else 'off'}.json"
    flags = [
        "--worker",
        "on" if on else "off",
        "--result",
        str(out),
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--timed-steps",
        str(args.timed_steps),
        "--threads",
        str(args.threads),
    ]
    flags += ["--dtype", args.dtype] if args.dtype else []  # fmt: skip
    return run_worker(MODULE, flags, out)


def _plot(rows: list[dict[str, Any]], info: RunInfo, path: Path) -> Path | None:
    fig = new_figure(11, 4.5, layout="constrained")
    if fig is None:
        return None
    mem, speed = fig.subplots(1, 2, sharey=True)
    names = [f"checkpointing {r['variant']}" for r in rows]
    persistent = [r["persistent_bytes"] / MiB for r in rows]
    step = [r["step_peak_bytes"] / MiB for r in rows]
    mem.barh(names, persistent, label="live at step start (weights, AdamW state)", color="tab:gray")
    mem.barh(names, step, left=persistent, label="added during the step (activations, grads)", color="tab:blue")
    mem.bar_label(mem.containers[1], labels=[f" {r['peak_bytes'] / MiB:,.0f} MiB" for r in rows])
    mem.set_xlim(0, 1.3 * max(r["peak_bytes"] for r in rows) / MiB)
    mem.set(xlabel="peak memory of a training step (MiB)", title="memory")
    mem.invert_yaxis()
    mem.legend(loc="lower right", fontsize=8)
    bars = speed.barh(names, [r["step_s"] for r in rows], color="tab:orange")
    speed.bar_label(bars, labels=[f" {r['step_s']:.2f} s" for r in rows])
    speed.set_xlim(0, 1.3 * max(r["step_s"] for r in rows))
    speed.set(xlabel="seconds per step (median)", title="time")
    r0 = rows[0]
    fig.suptitle(f"gradient checkpointing, {r0['preset']} {r0['batch_size']}x{r0['block_size']} {r0['dtype']}, "
                 f"{info.gpu}, {info.commit[:12]}", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'checkpointing':<14} {'peak MiB':>9} {'step MiB':>9} {'RSS MiB':>8} {'s/step':>7}"]
    for r in rows:
        lines.append(f"{r['variant']:<14} {r['peak_bytes'] / MiB:>9,.0f} {r['step_peak_bytes'] / MiB:>9,.0f} "
                     f"{r['max_rss_bytes'] / MiB:>8,.0f} {r['step_s']:>7.3f}")  # fmt: skip
    off, on = rows
    lines.append(f"peak memory on/off: {on['peak_bytes'] / off['peak_bytes']:.2f}x; "
                 f"step time on/off: {on['step_s'] / off['step_s']:.2f}x")  # fmt: skip
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_svc" / "results", help="results folder")
    p.add_argument("--preset", default=PRESET, help=f"train preset (default {PRESET})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument(
        "--batch-size", type=int, default=0, help=f"sequences per step (0: the preset's on CUDA, {CPU_BATCH} on CPU)"
    )
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), help="autocast dtype (default: the preset's on CUDA, float32 on CPU)"
    )
    p.add_argument("--timed-steps", type=int, default=2, help="steps timed after the measured one")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of each run (0: torch's default)")
    p.add_argument("--worker", choices=("on", "off"), help=argparse.SUPPRESS)  # internal: one variant, JSON to --result
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.worker:  # one variant, in this process
        if args.threads:
            torch.set_num_threads(args.threads)
        config = _config(args, args.worker == "on")
        vocab = get_preset(config.preset).vocab_size  # the tokenizer the preset is meant for (65 characters)
        args.result.write_text(json.dumps(measure_step(config, vocab, timed_steps=args.timed_steps)))
        return 0
    device = resolve_device(args.device)
    info = run_info(device, MODULE, argv)
    with tempfile.TemporaryDirectory(prefix="tinylm-ckpt-bench-") as tmp:
        rows = []
        for on in (False, True):
            log.info("checkpointing %s ...", "on" if on else "off")
            rows.append(_run_variant(args, on, Path(tmp)))
    rows = [{**r, "device": info.gpu, "commit": info.commit, "command": info.command} for r in rows]
    stem = args.out / f"checkpointing-{device_slug(device)}"
    doc = {"info": dataclasses.asdict(info), "results": rows,
           "peak_ratio_on_off": rows[1]["peak_bytes"] / rows[0]["peak_bytes"],
           "step_time_ratio_on_off": rows[1]["step_s"] / rows[0]["step_s"]}  # fmt: skip
    write_results(stem, CSV_COLUMNS, rows, doc, lambda png: _plot(rows, info, png))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
