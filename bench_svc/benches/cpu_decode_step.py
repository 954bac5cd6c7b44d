"""Where a CPU decode step's time goes, per `TorchRunner(cpu_weights=)` choice (inference_svc/PERF_NOTES.md section 10).

    python -m bench_svc.benches.cpu_decode_step                   # ms per batch-1 decode step, each weights choice
    python -m bench_svc.benches.cpu_decode_step --profile int8    # and torch.profiler's ops of that choice's steps
    python -m bench_svc.benches.cpu_decode_step --linears         # and the model's Linears alone, per design

The step is the engine's CPU path without the engine thread: `prefill_sample` of one prompt, then `decode_sample`
of one row, `--steps` times (shakespeare-char, random init, 1 thread unless --threads). Runners (each on its own copy
of the model) take turns, one request each per round, and the median over `--rounds` is printed: on a shared
machine, load that comes and goes hits every choice alike. `--linears` times the model's Linear shapes alone at one
row (every layer's, in order, as a decode step meets them) for fp32, bf16, `torch._weight_int8pack_mm` (the int8
choice's kernel) and `torch.ao` dynamic INT8 quantization (per channel; a design measured and not kept).
Printed, not written to results: figures for a person reading the notes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn

from inference_svc.cpu_weights import CPU_WEIGHTS, CpuInt8Linear
from inference_svc.runner import TorchRunner
from model.presets import get_preset
from model.sampling import SamplingParams
from model.transformer import GPT

__all__ = ["decode_step_ms", "linear_designs_us", "main"]

PRESET = "shakespeare-char"
N_SLOTS = 16  # the KV-cache slots of each runner: the serving bench's CPU plan (inference_serving.CPU_PLAN)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset(PRESET, vocab_size=65, dropout=0.0)).eval()


def _request(runner: TorchRunner, steps: int) -> float:
    """ms per decode step of one batch-1 request (prompt of 16 tokens, then `steps` greedy decode steps)."""
    prompt = list(range(16))
    runner.prefill_sample([0], [prompt], [SamplingParams(max_new_tokens=steps + 1, temperature=0.0)], [0])
    t0 = time.perf_counter()
    for j in range(steps):
        runner.decode_sample([0], len(prompt) + j + 1, full=False)
    return (time.perf_counter() - t0) / steps * 1e3


INT8_EAGER = "int8-eager"  # a benchmark choice beside CPU_WEIGHTS: int8 with cpu_compile=False ("int8" compiles)


def cpu_runner(model: GPT, n_slots: int, choice: str) -> TorchRunner:
    """A CPU TorchRunner on a copy of `model` for a CPU_WEIGHTS choice or INT8_EAGER."""
    if choice == INT8_EAGER:
        return TorchRunner(copy.deepcopy(model), n_slots, device="cpu", cpu_weights="int8", cpu_compile=False)
    return TorchRunner(copy.deepcopy(model), n_slots, device="cpu", cpu_weights=choice)


def decode_step_ms(
    model: GPT, weights: tuple[str, ...], steps: int, rounds: int, int8_eager: bool = False
) -> dict[str, float]:
    """Median ms per batch-1 decode step of a runner per weights choice, taken in turns (one request each a round).
    `int8_eager`: also an int8 runner with `cpu_compile=False` (INT8_EAGER; "int8" is compiled by default)."""
    runners = {w: cpu_runner(model, N_SLOTS, w) for w in weights + ((INT8_EAGER,) if int8_eager else ())}
    for runner in runners.values():
        _request(runner, 4)  # warm-up
    times: dict[str, list[float]] = {w: [] for w in runners}
    for _ in range(rounds):
        for w, runner in runners.items():
            times[w].append(_request(runner, steps))
    return {w: statistics.median(ts) for w, ts in times.items()}


def profile_table(model: GPT, weights: str, steps: int, rows: int = 20) -> str:
    """torch.profiler's ops over three requests of `steps` decode steps (their prefills included), by self time.
    INT8_EAGER: the int8 runner with `cpu_compile=False`."""
    from torch.profiler import ProfilerActivity, profile

    runner = cpu_runner(model, N_SLOTS, weights)
    _request(runner, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            _request(runner, steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _linear_designs(linears: list[nn.Linear]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each design's modules for `linears`, as one function over x (1, K) that runs them all in order."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's deprecation notices
        warnings.simplefilter("ignore")
        dynamic = [quantize_dynamic(nn.Sequential(m), {nn.Linear: per_channel_dynamic_qconfig}) for m in linears]
    designs = {
        "fp32": (linears, torch.float32),
        "bf16": ([copy.deepcopy(m).bfloat16() for m in linears], torch.bfloat16),
        "int8 (_weight_int8pack_mm)": ([CpuInt8Linear.from_linear(m) for m in linears], torch.float32),
        "int8 (torch.ao dynamic, per channel)": (dynamic, torch.float32),
    }

    def run_all(mods: list[nn.Module], dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        xs = {m: torch.randn(1, lin.in_features, dtype=dtype) for m, lin in zip(mods, linears)}
        return lambda _: [m(xs[m]) for m in mods][-1]

    return {name: run_all(mods, dtype) for name, (mods, dtype) in designs.items()}


def linear_designs_us(model: GPT, rounds: int, calls: int = 50) -> dict[str, float]:
    """Median us for one pass over the model's Linears (every layer's, at one row) per design, in turns."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    designs = _linear_designs(linears)
    x = torch.zeros(1)
    times: dict[str, list[float]] = {name: [] for name in designs}
    with torch.inference_mode():
        for run in designs.values():
            run(x)
        for _ in range(rounds):
            for name, run in designs.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    run(x)
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench_svc.benches.cpu_decode_step", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=",".join(CPU_WEIGHTS), help=f"comma-separated, of {list(CPU_WEIGHTS)}")
    p.add_argument("--steps", type=int, default=48, help="decode steps per request (default 48)")
    p.add_argument("--rounds", type=int, default=9, help="requests per weights choice, taken in turns (default 9)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--profile", default="", help="also print torch.profiler's ops of this weights choice's steps")
    p.add_argument("--linears", action="store_true", help="also time the model's Linears alone per design")
    p.add_argument("--int8-eager", action="store_true", help="also time int8 with cpu_compile=False ('int8-eager')")
    args = p.parse_args(argv)
    weights = tuple(filter(None, args.weights.split(",")))
    for w in weights:
        if w not in CPU_WEIGHTS:
            p.error(f"weights must be of {list(CPU_WEIGHTS)}, got {w!r}")
    if args.profile and args.profile not in (*CPU_WEIGHTS, INT8_EAGER):
        p.error(f"--profile must be of {[*CPU_WEIGHTS, INT8_EAGER]}, got {args.profile!r}")
    if args.steps < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--steps, --rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    model = _model()
    print(f"{PRESET} (random init), CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for w, ms in decode_step_ms(model, weights, args.steps, args.rounds, args.int8_eager).items():
        print(f"decode step, batch 1, {w:<10} {ms:7.3f} ms (median of {args.rounds})")
    if args.linears:
        for name, us in linear_designs_us(model, args.rounds).items():
            print(f"Linears alone (one pass, 1 row), {name:<38} {us:8.0f} us")
    if args.profile:
        print(f"\ntorch.profiler, {args.profile}, 3 requests of {args.steps} decode steps (and their prefills):")
        print(profile_table(model, args.profile, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
