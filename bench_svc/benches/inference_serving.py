"""Serving benchmark: the engine's decode latency and throughput, streaming gRPC under load, and Hugging Face
`generate` on a GPT-2-shaped model of the same size as the baseline, all measured in one run.

    python -m bench_svc.benches.inference_serving --device cuda  # GPU: bf16 + CUDA graphs, 256 sequences, 64 streams
    python -m bench_svc.benches.inference_serving --device cpu   # CPU: torch fp32/bf16/int8, ONNX Runtime INT8, small loads

Rows (one per measurement, same columns everywhere):
- `engine batch 1`: one request at a time; ms/token is the mean gap between its tokens (decode only).
- `engine N concurrent`: N requests submitted at once (prompt lengths 8..39, so sequences sit at different
  positions as they do in a live server); tokens/s is all generated tokens over the time from the first submit to
  the engine's last token (before 2026-11-29's second session: to the bench's single consumer thread's last read).
- `grpc N streams`: a server process (`python -m inference_svc serve`) and N streaming clients in separate
  client processes, each sending requests back to back; TTFT and inter-token gaps are measured by the clients.
- `hf generate`: transformers' GPT2LMHeadModel with the same width, depth, heads, vocabulary and context, same
  dtype and device, `generate(do_sample=False)` for the same number of new tokens (on CPU in float32 and bfloat16).
On CPU the torch engine runs once per `TorchRunner(cpu_weights=)` choice (fp32, bf16, int8), and their batch-1 rows
and HF generate's are timed in alternation (one request or `generate` call each per round, the median of
CPU_ALTERNATING_ROUNDS): on a shared machine, load that comes and goes hits every contender alike. Issue 17's CPU
target (`engine batch 1` rows): ms/token <= 0.6x the fastest HF generate row's.
The model is shakespeare-char with random weights unless --model names an artifact (speed does not depend
on the weights). Results: `<out>/inference-<cpu|gpu>.{csv,json,png}` with the device, commit and command.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import IO, Any, Callable

import torch

from bench_svc.benches.cpu_decode_step import INT8_EAGER, cpu_runner
from bench_svc.benches.grpc_clients import grpc_load, percentile as _pct
from bench_svc.provenance import LOAD_KEYS, device_name, git_commit, machine_load
from inference_svc.engine import Engine
from inference_svc.params import Request
from inference_svc.cpu_weights import CPU_WEIGHTS
from inference_svc.runner import ModelRunner, TorchRunner
from model.artifact import load_artifact, save_artifact
from model.presets import get_preset
from model.sampling import SamplingParams
from model.tokenizers import CharTokenizer
from model.transformer import GPT

__all__ = ["Row", "main", "engine_latency", "engine_throughput", "grpc_load", "hf_generate", "hf_generate_call"]

MODULE = "bench_svc.benches.inference_serving"
ROOT = Path(__file__).resolve().parents[2]
PRESET = "shakespeare-char"
PROMPT_LENGTHS = range(8, 40)  # cycled over concurrent requests
# Targets from issue 17 (GPU, shakespeare-char).
TARGET_MS_PER_TOKEN = 0.12
TARGET_ENGINE_TOKENS_PER_S = 500_000
TARGET_SAMPLED_SHARE = 0.85  # sampled (T 0.8, top-k 50, top-p 0.95) within 15% of greedy
TARGET_GRPC_TOKENS_PER_S = {64: 100_000, 256: 150_000}  # by streams
TARGET_CPU_SHARE_OF_HF = 0.6  # issue 17, CPU, 1 thread, batch 1: engine ms/token <= 0.6x HF generate's
CPU_ALTERNATING_ROUNDS = 9  # rounds of the CPU batch-1 comparison (each contender once per round)


@dataclass(frozen=True)
class Row:
    backend: str  # "torch cuda bfloat16 graphs", "torch cpu int8 weights", "onnx int8 cpu", "hf generate cpu bfloat16"
    scenario: str  # "engine batch 1", "engine 256 concurrent", "grpc 64 streams", "hf generate batch 1"
    concurrency: int
    new_tokens: int  # per request
    ms_per_token: float | None  # batch 1: mean gap between tokens of one request
    tokens_per_s: float  # all generated tokens / wall time
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    itl_p50_ms: float | None = None  # inter-token latency
    itl_p95_ms: float | None = None
    target: str = ""  # the target for this row, if any
    meets_target: bool | None = None


@dataclass(frozen=True)
class Plan:
    """How big each measurement is (GPU sizes by default; --device cpu scales them down)."""

    new_tokens: int
    latency_repeats: int
    concurrency: int
    grpc_streams: tuple[int, ...]  # one row per count
    grpc_requests_per_stream: int
    grpc_client_processes: int


GPU_PLAN = Plan(
    new_tokens=200,
    latency_repeats=5,
    concurrency=256,
    grpc_streams=(64, 256),
    grpc_requests_per_stream=8,
    grpc_client_processes=8,
)
CPU_PLAN = Plan(
    new_tokens=48,
    latency_repeats=3,
    concurrency=16,
    grpc_streams=(8,),
    grpc_requests_per_stream=2,
    grpc_client_processes=2,
)


def _prompts(n: int, vocab_size: int, equal: bool = False) -> list[tuple[int, ...]]:
    """n random prompts of lengths 8, 9, ... 39, 8, ... (or all of length 16)."""
    gen = torch.Generator().manual_seed(0)
    lengths = [16 if equal else PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(n)]
    return [tuple(torch.randint(0, vocab_size, (t,), generator=gen).tolist()) for t in lengths]


def _greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0.0)


# Engine ------------------------------------------------------------------------------------------------


def engine_latency(engine: Engine, prompt: tuple[int, ...], new_tokens: int, repeats: int) -> tuple[float, float]:
    """Median over `repeats` single requests of (mean inter-token ms, TTFT ms)."""
    engine.submit(Request(prompt, _greedy(4))).result()  # warm-up
    itl, ttft = zip(*(_one_request(engine, prompt, new_tokens) for _ in range(repeats)))
    return statistics.median(itl), statistics.median(ttft)


def _one_request(engine: Engine, prompt: tuple[int, ...], new_tokens: int) -> tuple[float, float]:
    """(mean inter-token ms, TTFT ms) of one greedy request."""
    final = engine.submit(Request(prompt, _greedy(new_tokens))).result()
    return final.timings.mean_inter_token_ms, final.timings.ttft_ms


def _sampled(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_k=50, top_p=0.95)


def engine_throughput(
    engine: Engine, prompts: list[tuple[int, ...]], new_tokens: int, sampled: bool = False
) -> dict[str, float | None]:
    """Submit every prompt at once (`Engine.submit_many`: greedy, or sampled at T 0.8, top-k 50, top-p 0.95); tokens/s
    from the submit to the engine's last token (each request's timings say when the engine streamed its tokens),
    with TTFT and inter-token percentiles. The bench's one consumer thread reads the streams after that: at 256
    streams it drains ~8 us per chunk, slower than the engine writes them, so its wall time would measure the
    consumer. (Submitted one by one from this thread, while the engine thread already runs, the requests trickled in
    over ~0.2 s on the H200, fighting the engine for the GIL: the figure measured the submitting thread.)"""
    params = _sampled(new_tokens) if sampled else _greedy(new_tokens)
    for h in engine.submit_many([Request(p, replace(params, max_new_tokens=2)) for p in prompts]):  # warm-up
        h.result()
    requests = [Request(p, params) for p in prompts]
    start = time.perf_counter()
    handles = engine.submit_many(requests)
    finals = [h.result() for h in handles]
    consumer_wall = time.perf_counter() - start
    wall = max(f.timings.token_ms[-1] for f in finals if f.timings.token_ms) / 1e3  # from each request's arrival
    print(f"engine: {wall:.3f} s to its last token; the bench's consumer thread done at {consumer_wall:.3f} s")
    gaps = [b - a for f in finals for a, b in zip(f.timings.token_ms, f.timings.token_ms[1:])]
    ttft = [f.timings.ttft_ms for f in finals]
    return {
        "tokens_per_s": sum(len(f.token_ids) for f in finals) / wall,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p95_ms": _pct(ttft, 95),
        "itl_p50_ms": _pct(gaps, 50),
        "itl_p95_ms": _pct(gaps, 95),
    }


def _engine_rows(
    backend: str,
    runner: ModelRunner,
    tokenizer,
    plan: Plan,
    on_gpu: bool,
    equal_too: bool = False,
    latency: tuple[float, float] | None = None,
) -> list[Row]:
    """Batch-1 latency and N-concurrent throughput (and, with `equal_too`, N prompts of one length: the case
    where the ORT runner can put every sequence in one call). With multi-step decode (the engine's default on CUDA
    graphs: `decode_steps` tokens per row per engine step) the same rows are also taken at one step per launch, and
    the inter-token percentiles count the zero gaps inside a row's run of tokens (they arrive together).
    `latency`: the batch-1 (ms/token, TTFT ms) measured already (the CPU comparison's alternation), not again here."""
    prompts = _prompts(plan.concurrency, runner.vocab_size)
    with Engine(runner, tokenizer, max_queue=plan.concurrency) as engine:
        steps = engine.decode_steps
        ms, ttft = latency or engine_latency(engine, prompts[8], plan.new_tokens, plan.latency_repeats)
        batch = engine_throughput(engine, prompts, plan.new_tokens)
        sampled = engine_throughput(engine, prompts, plan.new_tokens, sampled=True) if on_gpu else None
        equal = (
            engine_throughput(engine, _prompts(plan.concurrency, runner.vocab_size, equal=True), plan.new_tokens)
            if equal_too
            else None
        )
    extra: list[Row] = []
    if steps > 1:  # in-run anchor: the same engine launching one decode step per engine step
        with Engine(runner, tokenizer, max_queue=plan.concurrency, decode_steps=1) as engine:
            one_ms, one_ttft = engine_latency(engine, prompts[8], plan.new_tokens, plan.latency_repeats)
            one = engine_throughput(engine, prompts, plan.new_tokens)
        extra += [
            Row(backend, "engine batch 1, 1 decode step per launch", 1, plan.new_tokens, one_ms, 1e3 / one_ms,
                one_ttft, one_ttft, one_ms, one_ms),
            Row(backend, f"engine {plan.concurrency} concurrent, 1 decode step per launch", plan.concurrency,
                plan.new_tokens, None, **one),
        ]  # fmt: skip
    extra += (
        [
            Row(
                backend,
                f"engine {plan.concurrency} concurrent, equal prompts",
                plan.concurrency,
                plan.new_tokens,
                None,
                **equal,
            )
        ]
        if equal
        else []
    )
    if sampled:
        share = sampled["tokens_per_s"] / batch["tokens_per_s"]
        extra.append(
            Row(
                backend,
                f"engine {plan.concurrency} concurrent, sampled",
                plan.concurrency,
                plan.new_tokens,
                None,
                **sampled,
                target=f">= {TARGET_SAMPLED_SHARE:.0%} of greedy (now {share:.0%})",
                meets_target=share >= TARGET_SAMPLED_SHARE,
            )
        )
    return extra + [
        Row(
            backend,
            "engine batch 1",
            1,
            plan.new_tokens,
            ms,
            1e3 / ms,
            ttft,
            ttft,
            ms,
            ms,
            f"<= {TARGET_MS_PER_TOKEN} ms/token" if on_gpu else "",
            ms <= TARGET_MS_PER_TOKEN if on_gpu else None,
        ),
        Row(
            backend,
            f"engine {plan.concurrency} concurrent",
            plan.concurrency,
            plan.new_tokens,
            None,
            **batch,
            target=f">= {TARGET_ENGINE_TOKENS_PER_S} tok/s" if on_gpu else "",
            meets_target=batch["tokens_per_s"] >= TARGET_ENGINE_TOKENS_PER_S if on_gpu else None,
        ),
    ]


# gRPC ----------------------------------------------------------------------------------------------------


def _child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child run from the repo root: ROOT first on PYTHONPATH, the caller's kept."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _start_server(
    model_path: Path, device: str, max_slots: int, threads: int, engine_process: bool = False
) -> tuple[subprocess.Popen, str, IO[str]]:
    """The server process, its address, and the file its stderr goes to (shown if it fails to start or stop);
    `engine_process`: its engine in a process of its own (`serve --engine-process`)."""
    argv = [
        sys.executable,
        "-m",
        "inference_svc",
        "serve",
        "--model",
        str(model_path),
        "--port",
        "0",
        "--device",
        device,
        "--max-slots",
        str(max_slots),
        "--max-queue",
        str(4 * max_slots),
        "--threads",
        str(threads),
        "--engine-process",
        "on" if engine_process else "off",
    ]
    env = _child_env(TINYLM_TOKEN="")
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    line = proc.stdout.readline()
    match = re.search(r" on (\S+)$", line.strip())
    if not match:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"inference server did not start: {line!r}; its stderr ends:\n{_tail(errors, 3000)}")
    return proc, match.group(1), errors


def _tail(errors: IO[str], n: int) -> str:
    errors.seek(0)
    return errors.read()[-n:]


def _stop_server(proc: subprocess.Popen, errors: IO[str]) -> None:
    """SIGTERM, then (a server that has not exited within 30 s is a bug worth seeing) its threads' stacks on stderr
    through SIGUSR1 (inference_svc.main registers faulthandler), then SIGKILL: the row's figures are already taken."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
        return
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        proc.wait()
        print(f"warning: the inference server ignored SIGTERM for 30 s; its stderr ends:\n{_tail(errors, 6000)}")


def _grpc_row(
    backend: str,
    model_path: Path,
    tokenizer,
    device: str,
    plan: Plan,
    on_gpu: bool,
    threads: int,
    streams: int,
    engine_process: bool = False,
) -> Row:
    prompt = tokenizer.decode(list(_prompts(1, tokenizer.vocab_size)[0]))
    proc, address, errors = _start_server(model_path, device, streams, threads, engine_process)
    try:
        load = grpc_load(
            address, streams, plan.grpc_requests_per_stream, prompt, plan.new_tokens, plan.grpc_client_processes
        )
    finally:
        _stop_server(proc, errors)
    load = {k: load[k] for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms")}  # Row's
    target = TARGET_GRPC_TOKENS_PER_S.get(streams) if on_gpu else None
    return Row(
        backend + (", engine process" if engine_process else ""),
        f"grpc {streams} streams",
        streams,
        plan.new_tokens,
        None,
        **load,
        target=f">= {target} tok/s" if target else "",
        meets_target=load["tokens_per_s"] >= target if target else None,
    )


# Hugging Face baseline ---------------------------------------------------------------------------------


def hf_generate(
    config, device: torch.device, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int, repeats: int
) -> float | None:
    """Seconds per `generate` call (median) of a random GPT2LMHeadModel shaped like `config`; None without transformers."""
    call = hf_generate_call(config, device, dtype, batch, prompt_len, new_tokens)
    return None if call is None else statistics.median(call() for _ in range(repeats))


def hf_generate_call(
    config, device: torch.device, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int
) -> Callable[[], float] | None:
    """A function that times one greedy `generate` call (seconds) of a random GPT2LMHeadModel shaped like `config`,
    warmed up; None without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(hf_config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    @torch.inference_mode()
    def call() -> float:
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        _sync(device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    return call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_rows(config, device: torch.device, dtype: torch.dtype, plan: Plan, batches: tuple[int, ...] = ()) -> list[Row]:
    """HF generate's rows at `batches` (default: 1 and the plan's concurrency)."""
    backend = _hf_backend(device, dtype)
    rows = []
    for batch in batches or (1, plan.concurrency):
        s = hf_generate(config, device, dtype, batch, 16, plan.new_tokens, plan.latency_repeats if batch == 1 else 1)
        if s is None:
            return []
        ms = s * 1e3 / plan.new_tokens if batch == 1 else None
        rows.append(Row(backend, f"hf generate batch {batch}", batch, plan.new_tokens, ms, batch * plan.new_tokens / s))
    return rows


def _hf_backend(device: torch.device, dtype: torch.dtype) -> str:
    return f"hf generate {device.type} {str(dtype).removeprefix('torch.')}"


# CPU: the engine per weights choice against HF generate -------------------------------------------------------


def _cpu_backend(weights: str) -> str:
    return {"fp32": "torch cpu float32", "bf16": "torch cpu bfloat16", "int8": "torch cpu int8 weights",
            INT8_EAGER: "torch cpu int8 weights, eager"}[weights]  # fmt: skip


def _cpu_engine_rows(model: GPT, tokenizer, plan: Plan, with_hf: bool, int8_eager: bool = False) -> list[Row]:
    """The engine once per `TorchRunner(cpu_weights=)` choice (each on its own copy of `model`), and with `with_hf`
    HF generate's batch-1 rows in float32 and bfloat16. Batch-1 latencies are taken in alternation (`_alternating`);
    each engine batch-1 row gets issue 17's CPU target against the fastest HF generate row. `int8_eager`: also int8
    with `cpu_compile=False` (the int8 row's batch-1 steps are compiled by default)."""
    cpu = torch.device("cpu")
    runners = {w: cpu_runner(model, plan.concurrency, w) for w in CPU_WEIGHTS + ((INT8_EAGER,) if int8_eager else ())}
    hf = {}
    for dtype in (torch.float32, torch.bfloat16) if with_hf else ():
        call = hf_generate_call(model.config, cpu, dtype, 1, 16, plan.new_tokens)
        if call is not None:
            hf[_hf_backend(cpu, dtype)] = call
    prompt = _prompts(plan.concurrency, model.config.vocab_size)[8]
    latency, hf_ms = _alternating(runners, tokenizer, hf, prompt, plan)
    best = min(hf_ms.items(), key=lambda kv: kv[1], default=None)  # (backend, ms/token)
    rows = []
    for w, runner in runners.items():
        for row in _engine_rows(_cpu_backend(w), runner, tokenizer, plan, on_gpu=False, latency=latency[w]):
            if row.scenario == "engine batch 1" and best is not None:
                share = row.ms_per_token / best[1]
                row = replace(
                    row,
                    target=f"<= {TARGET_CPU_SHARE_OF_HF}x {best[0]} ({best[1]:.2f} ms; now {share:.2f}x)",
                    meets_target=share <= TARGET_CPU_SHARE_OF_HF,
                )
            rows.append(row)
    return rows + [
        Row(backend, "hf generate batch 1", 1, plan.new_tokens, ms, 1e3 / ms) for backend, ms in hf_ms.items()
    ]


def _alternating(
    runners: dict[str, TorchRunner], tokenizer, hf: dict[str, Callable[[], float]], prompt: tuple[int, ...], plan: Plan
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Batch-1 figures of every engine and HF generate call, taken in alternation: each round runs one request on
    every engine and one `generate` call of each HF model; medians over CPU_ALTERNATING_ROUNDS rounds. Returns
    ({weights: (ms/token, TTFT ms)}, {HF backend: ms/token})."""
    with contextlib.ExitStack() as stack:
        engines = {w: stack.enter_context(Engine(r, tokenizer, max_queue=plan.concurrency)) for w, r in runners.items()}
        for engine in engines.values():
            engine.submit(Request(prompt, _greedy(4))).result()  # warm-up
        times: dict[str, list] = {name: [] for name in [*engines, *hf]}
        for _ in range(CPU_ALTERNATING_ROUNDS):
            for w, engine in engines.items():
                times[w].append(_one_request(engine, prompt, plan.new_tokens))
            for backend, call in hf.items():
                times[backend].append(call() * 1e3 / plan.new_tokens)
    latency = {w: tuple(statistics.median(xs) for xs in zip(*times[w])) for w in engines}
    return latency, {backend: statistics.median(times[backend]) for backend in hf}


# Model, artifacts, results --------------------------------------------------------------------------------


def _model_artifact(model_ref: str, store: Path) -> Path:
    """--model's folder, or a random-init shakespeare-char saved into `store`."""
    if model_ref:
        return Path(model_ref)
    text = "".join(chr(c) for c in range(32, 32 + 65))  # 65 characters, the Tiny Shakespeare vocabulary's size
    tokenizer = CharTokenizer.from_corpus(text)
    torch.manual_seed(0)
    model = GPT(get_preset(PRESET, vocab_size=tokenizer.vocab_size, dropout=0.0))
    return store / save_artifact(store, model, tokenizer, name="bench-shakespeare-char", preset=PRESET)


def _export_int8(path: Path, threads: int) -> Path:
    """The artifact's onnx/model-int8.onnx, exported by the exporter's own CLI when missing."""
    if not (path / "onnx" / "model-int8.onnx").is_file():
        env = _child_env()
        env.pop("TINYLM_CORPUS", None)  # random-init weights over a made-up vocabulary: no corpus to score against
        argv = [
            sys.executable,
            "-m",
            "exporter.main",
            str(path),
            "--formats",
            "int8",
            "--no-gate",
            "-q",
            "--threads",
            str(threads),
        ]
        subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return path


def write_results(out: Path, stem: str, header: dict[str, Any], rows: list[Row]) -> list[Path]:
    """`<out>/<stem>.csv` (header as `# key: value` lines), `.json` and `.png` (tokens/s and ms/token)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = [f.name for f in fields(Row)]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        for key, value in header.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    (out / f"{stem}.json").write_text(
        json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    _plot(out / f"{stem}.png", header, rows)
    return [out / f"{stem}.{ext}" for ext in ("csv", "json", "png")]


def _plot(path: Path, header: dict[str, Any], rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.backend}\n{r.scenario}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.55 * len(rows) + 2.5))
    left.barh(labels, [r.tokens_per_s for r in rows], color="tab:blue")
    left.set_xscale("log")
    left.set_xlabel("generated tokens / s (log)")
    latency = [(lab, r.ms_per_token) for lab, r in zip(labels, rows) if r.ms_per_token is not None]
    right.barh([lab for lab, _ in latency], [ms for _, ms in latency], color="tab:orange")
    right.set_xlabel("decode ms / token at batch 1")
    for ax in (left, right):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"tinylm inference, {PRESET} — {header['device']} @ {header['git_commit'][:12]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--model", default="", help="artifact folder to serve (default: random-init shakespeare-char)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_svc" / "results", help="results folder")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: engine,grpc,onnx,hf")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch and ONNX Runtime (0: their default); "
        "1 gives steadier figures on a shared, oversubscribed machine",
    )
    p.add_argument(
        "--cpu-int8-eager", action="store_true", help="CPU: also the int8 engine with cpu_compile=False, in the turns"
    )
    p.add_argument(
        "--grpc-engine",
        default="auto",
        help="the gRPC rows' server: its engine on a thread of the server process (thread), in a process of its own "
        "(process: serve --engine-process), both side by side (thread,process), or auto (serve's own default: process "
        "on a CUDA device, thread elsewhere)",
    )
    args = p.parse_args(argv)
    if args.grpc_engine == "auto":
        from inference_svc.main import engine_process_by_default  # serve's own choice (imports the gRPC server)

        args.grpc_engine = "process" if engine_process_by_default("torch", torch.device(args.device)) else "thread"
    engines = args.grpc_engine.split(",")
    if not engines or any(e not in ("thread", "process") for e in engines):
        print(f"--grpc-engine must be auto or list thread and/or process, got {args.grpc_engine!r}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    plan = GPU_PLAN if on_gpu else CPU_PLAN
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as store:
        path = _model_artifact(args.model, Path(store))
        artifact = load_artifact(path, device=device)
        dtype = torch.bfloat16 if on_gpu else torch.float32
        kind = f"torch {device.type} {str(dtype).removeprefix('torch.')}" + (" graphs" if on_gpu else "")
        rows: list[Row] = []
        if "engine" not in skip and on_gpu:
            runner = TorchRunner(artifact.model, n_slots=plan.concurrency, device=device, dtype=dtype)
            rows += _engine_rows(kind, runner, artifact.tokenizer, plan, on_gpu)
            del runner
        elif "engine" not in skip:  # every CPU weights choice, batch 1 in alternation with HF generate's
            rows += _cpu_engine_rows(
                artifact.model, artifact.tokenizer, plan, with_hf="hf" not in skip, int8_eager=args.cpu_int8_eager
            )
        if "grpc" not in skip:
            for streams in plan.grpc_streams:
                for engine in engines:
                    rows.append(
                        _grpc_row(
                            kind,
                            path,
                            artifact.tokenizer,
                            args.device,
                            plan,
                            on_gpu,
                            args.threads,
                            streams,
                            engine_process=engine == "process",
                        )
                    )
        if "onnx" not in skip:
            from inference_svc.ort_runner import OrtRunner

            ort = OrtRunner(
                _export_int8(path, args.threads), n_slots=CPU_PLAN.concurrency, variant="int8", threads=args.threads
            )
            rows += _engine_rows("onnx int8 cpu", ort, artifact.tokenizer, CPU_PLAN, on_gpu=False, equal_too=True)
        if "hf" not in skip and on_gpu:
            rows += _hf_rows(artifact.config, device, dtype, plan)
        elif "hf" not in skip:  # batch 1 already taken beside the engines (unless they were skipped)
            batches = (plan.concurrency,) if "engine" not in skip else ()
            rows += [
                r for d in (torch.float32, torch.bfloat16) for r in _hf_rows(artifact.config, device, d, plan, batches)
            ]

    header = {
        "device": device_name(device),
        "git_commit": git_commit(),
        "command": _command(argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{PRESET} ({artifact.model.num_params() / 1e6:.2f}M params, {'random init' if not args.model else args.model})",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        LOAD_KEYS[0]: machine_load(),  # the harness's key and figure (1-minute load), as report.md reads it
        "wall_s": round(time.perf_counter() - started, 1),
    }
    paths = write_results(args.out, f"inference-{'gpu' if on_gpu else 'cpu'}", header, rows)
    _print_table(rows)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _command(argv: list[str] | None) -> str:
    """The command line as run from the repository root (interpreter relative to it, PYTHONPATH if set)."""
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return env + " ".join([python, "-m", MODULE, *(argv if argv is not None else sys.argv[1:])])


def _print_table(rows: list[Row]) -> None:
    fmt = lambda v: "-" if v is None else f"{v:,.3f}" if isinstance(v, float) and v < 100 else f"{v:,.0f}"  # noqa: E731
    print(
        f"{'backend':<26} {'scenario':<24} {'ms/tok':>8} {'tok/s':>10} {'ttft p50/p95 ms':>18} {'itl p50/p95 ms':>16}  target"
    )
    for r in rows:
        ok = "" if r.meets_target is None else (" ok" if r.meets_target else " MISSED")
        print(
            f"{r.backend:<26} {r.scenario:<24} {fmt(r.ms_per_token):>8} {fmt(r.tokens_per_s):>10} "
            f"{fmt(r.ttft_p50_ms) + '/' + fmt(r.ttft_p95_ms):>18} {fmt(r.itl_p50_ms) + '/' + fmt(r.itl_p95_ms):>16}  {r.target}{ok}"
        )


if __name__ == "__main__":
    sys.exit(main())
