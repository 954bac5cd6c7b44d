"""Speculative decoding in the serving engine: tokens/s and ms/token with a `tiny` draft for a `shakespeare-char`
target, at batch 1 and with several requests in flight, against the same engine without a draft, in the same run.

    python -m bench_svc.benches.speculative_engine --corpus FILE [--device cuda] [--concurrency 1,16] [--k 1,2,3,4]
        [--rounds loop,draft,draft+verify+accept]

Trains the two models as `bench_svc.benches.speculative` does (same options; or loads them with --target-artifact and
--draft-artifact), then for each concurrency, sampling mode (greedy; sampled at temperature 0.8, top-k 50, top-p
0.95, seeded) and k (0: no draft, the anchor) submits that many held-out prompts to an engine at once and times
until every one has finished. Every engine is device-resident (on the GPU: CUDA graphs, the rounds captured too), so
the comparison is speculative rounds against plain resident steps. Repeats run interleaved and the median is
reported; ms/token is per stream (seconds x concurrency / tokens). Greedy rows also check that the tokens equal the
anchor's. `--rounds`: the round designs to build engines for, each k, in the same run over the same models: `loop`
(the draft's steps one forward at a time, the verify over the cache in place, the acceptance in torch ops), or a
`+`-joined set of the kernels that replace those parts: `draft` (the draft's k + 1 steps in one launch,
kernels.draft_steps), `verify` (the verify on the target's small-batch decode kernels), `accept` (a sampled round's
acceptance in one launch, kernels.accept_round), `sample` (a sampled round's uniforms and each draft step's draw in
one launch each, kernels.accept_round's uniform_grid and draft_sample), `finish` (the round's tail after the verify:
a greedy round's argmax and acceptance, the slot state and the output, in one launch, kernels.accept_round's
finish_round), and `kplus1` (not a kernel: the draft loop's k + 1 forwards a round,
d_k's keys and values by a forward of its own, where the default carries them to the next round's first); on CPU
their references run. Writes
`bench_svc/results/speculative-engine-<cpu|cuda>[-<rounds>][-distilled].{csv,json,png}` (no rounds suffix for `loop`
alone; `-distilled` with --draft-distill, the draft trained on the target's distributions); the short table is printed
last.
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench_svc.benches.speculative import (
    DRAFT_PRESET,
    TARGET_PRESET,
    build_parser,
    held_out_prompts,
    make_header,
    result_row,
    trained_models,
    write_results,
)
from bench_svc.provenance import git_commit
from inference_svc.engine import Engine
from inference_svc.params import Request
from inference_svc.runner import TorchRunner, batch_buckets
from model.sampling import SamplingParams
from tools.profiling import format_top, replay_kernels, top_kernels

__all__ = ["main"]

MODULE = "bench_svc.benches.speculative_engine"
log = logging.getLogger(MODULE)
# The sampling of each mode (the sampled setting).
MODES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "sample": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
}


# the round's parts a kernel can replace (Engine's *_kernel(s) options), and kplus1: the draft loop's k + 1 forwards a
# round as before carry_draft (Engine(carry_draft=False))
PARTS = ("draft", "verify", "accept", "sample", "finish", "kplus1")
Variant = tuple[int, frozenset]  # (k, the parts on kernels); (0, frozenset()): the engine without a draft


def parse_rounds(text: str) -> list[frozenset]:
    """`--rounds` -> each design's set of parts on kernels (`loop`: none). Raises ValueError naming a bad part."""
    designs = []
    for design in text.split(","):
        parts = frozenset() if design.strip() == "loop" else frozenset(p.strip() for p in design.split("+"))
        bad = sorted(parts - set(PARTS))
        if bad or not design.strip():
            raise ValueError(f"--rounds: {design!r} is not 'loop' or a '+'-joined set of {', '.join(PARTS)}")
        designs.append(parts)
    return list(dict.fromkeys(designs))


def _label(parts: frozenset) -> str:
    return "+".join(p for p in PARTS if p in parts) or "loop"


def _engines(target, draft, tokenizer, concurrency: int, variants: list[Variant], device: torch.device) -> dict:
    """One device-resident engine per variant with `concurrency` slots; the target and draft weights are shared."""
    engines = {}
    for k, parts in variants:
        runner = TorchRunner(target, concurrency, device=device)
        drafter = TorchRunner(draft, concurrency, device=device) if k else None
        engines[(k, parts)] = Engine(
            runner,
            tokenizer,
            max_queue=concurrency,
            draft=drafter,
            speculative_k=max(k, 1),
            draft_kernel="draft" in parts,
            verify_kernels="verify" in parts,
            accept_kernel="accept" in parts,
            sample_kernels="sample" in parts,
            finish_kernel="finish" in parts,
            carry_draft="kplus1" not in parts,
            resident=True,
        )
    return engines


def _round(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list[list[int]]]:
    """Submit every prompt at once (one batch); seconds until all have finished, and each one's tokens."""
    start = time.perf_counter()
    handles = engine.submit_many([Request(prompt_ids=tuple(p), params=sp) for p, sp in zip(prompts, params)])
    tokens = [[t for chunk in h for t in chunk.token_ids] for h in handles]
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(f"python -m {MODULE}", __doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16", help="requests in flight at once, comma-separated")
    parser.add_argument(
        "--rounds",
        default="loop",
        help="round designs, comma-separated: loop, or a +-joined set of draft, verify, accept, sample, finish (the parts on kernels), kplus1",
    )
    parser.set_defaults(k="1,2,3,4")
    args = parser.parse_args(argv)
    try:
        designs = parse_rounds(args.rounds)
    except ValueError as err:
        print(f"{MODULE}: {err}", file=sys.stderr)
        return 2
    commit = git_commit()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.target_artifact and args.draft_artifact) and (not args.corpus or not Path(args.corpus).is_file()):
        print(f"{MODULE} needs the corpus: pass --corpus FILE or set TINYLM_CORPUS", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    text = Path(args.corpus).read_text(encoding="utf-8") if args.corpus else ""
    target, draft, tokenizer, training = trained_models(args, text)
    target, draft = copy.deepcopy(target).eval(), copy.deepcopy(draft).eval()  # runners may cast them (bf16 on CUDA)
    ks = [int(k) for k in args.k.split(",") if int(k) > 0]
    variants = [(0, frozenset()), *((k, parts) for parts in designs for k in ks)]
    rows = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        try:
            prompts = held_out_prompts(text, tokenizer, concurrency) if text else [[0] * 8] * concurrency
        except ValueError as err:  # loaded models whose tokenizer does not cover the corpus
            print(f"{MODULE}: prompts from --corpus: {err}", file=sys.stderr)
            return 2
        prompts = (prompts * concurrency)[:concurrency]
        engines = _engines(target, draft, tokenizer, concurrency, variants, device)
        try:
            rows += _measure(engines, prompts, concurrency, args)
        finally:
            for engine in engines.values():
                engine.close()
    anchor = next(r for r in rows if r["k"] == 0 and r["mode"] == "greedy")
    header = make_header(
        args,
        MODULE,
        argv,
        f"the engine without a draft, greedy, concurrency {anchor['concurrency']} = {anchor['tokens_per_s']} tokens/s",
        commit,
    )
    suffix = "" if designs == [frozenset()] else "-" + "-".join(_label(d) for d in designs).replace("+", "_")
    suffix += "-distilled" if args.draft_distill else ""
    summary = {
        "training": training,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "rounds": [_label(d) for d in designs],
        "best_speedup": max(r["speedup_vs_target"] for r in rows if r["k"] > 0),
        "best_k": {
            series: max((r for r in rows if r["series"] == series and r["k"] > 0), key=lambda r: r["tokens_per_s"])["k"]
            for series in dict.fromkeys(r["series"] for r in rows if r["k"] > 0)
        },
    }
    paths = write_results(
        args.out_dir,
        f"speculative-engine-{device.type}{suffix}",
        header,
        rows,
        summary,
        f"speculative decoding in the engine, {DRAFT_PRESET} draft for {TARGET_PRESET}, rounds: "
        + ", ".join(_label(d) for d in designs),
    )
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    print(format_table(rows))
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per row: throughput and per-stream ms/token against the engine without a draft; graph ms: the GPU's
    time for one plain step (k = 0) or one round, and the kernels a replay launches; tokens per engine iteration and its host split (us: launching,
    waiting for the GPU, streaming)."""
    head = (
        f"{'series':<34} {'k':>2} {'tok/s':>9} {'ms/tok':>7} {'speed-up':>8} {'accept':>7} {'graph ms':>8} {'same':>5}"
        f" {'tok/it':>6} {'launch':>6} {'wait':>6} {'stream':>6} {'kernels':>7}"
    )
    lines = [head]
    for r in rows:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = "-" if r["same_tokens_as_target"] is None else str(r["same_tokens_as_target"])
        graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.3f}"
        lines.append(
            f"{r['series']:<34} {r['k']:>2} {r['tokens_per_s']:>9.1f} {r['ms_per_token']:>7.3f} "
            f"{r['speedup_vs_target']:>7.2f}x {accept:>7} {graph:>8} {same:>5}"
            f" {r['tokens_per_iteration']:>6.2f} {r['launch_us']:>6.0f} {r['wait_us']:>6.0f} {r['stream_us']:>6.0f}"
            f" {'-' if r['graph_kernels'] is None else r['graph_kernels']:>7}"
        )
    return "\n".join(lines)


def _measure(engines: dict[Variant, Engine], prompts: list[list[int]], concurrency: int, args) -> list[dict[str, Any]]:
    params = {
        mode: [
            SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed + i, **sampling)
            for i in range(len(prompts))
        ]
        for mode, sampling in MODES.items()
    }
    for engine in engines.values():  # first uses (a prefill graph of a new shape, cuBLAS plans) outside the timing
        for sampling in MODES.values():
            _round(engine, prompts, [SamplingParams(max_new_tokens=8, seed=1, **sampling)] * len(prompts))
    seconds: dict[tuple[str, Variant], list[float]] = {(m, v): [] for m in MODES for v in engines}
    tokens: dict[tuple[str, Variant], list[list[int]]] = {}
    accepted: dict[tuple[str, Variant], tuple[int, int]] = {key: (0, 0) for key in seconds}
    loops: dict[tuple[str, Variant], list[float]] = {
        key: [0.0] * 4 for key in seconds
    }  # iterations, launch/wait/stream s
    anchor_of = {mode: (mode, (0, frozenset())) for mode in MODES}
    for rep in range(args.repeats):
        for mode, v in seconds:
            before = engines[v].stats()
            s, tokens[(mode, v)] = _round(engines[v], prompts, params[mode])
            after = engines[v].stats()
            seconds[(mode, v)].append(s)
            prop, acc = accepted[(mode, v)]
            accepted[(mode, v)] = (
                prop + after.draft_proposed - before.draft_proposed,
                acc + after.draft_accepted - before.draft_accepted,
            )
            was, now = before.loop, after.loop
            for i, name in enumerate(("iterations", "launch_s", "wait_s", "stream_s")):
                loops[(mode, v)][i] += getattr(now, name) - getattr(was, name)
        log.info("concurrency %d: timing round %d/%d done", concurrency, rep + 1, args.repeats)
    rows = []
    for (mode, (k, parts)), times in seconds.items():
        n_tokens = sum(len(t) for t in tokens[(mode, (k, parts))])
        median, anchor = statistics.median(times), statistics.median(seconds[anchor_of[mode]])
        proposed, ok = accepted[(mode, (k, parts))]
        same = tokens[(mode, (k, parts))] == tokens[anchor_of[mode]] if mode == "greedy" and k else None
        row = result_row(
            mode,
            k,
            f"engine, speculative ({_label(parts)})" if k else "engine, no draft",
            n_tokens,
            median,
            anchor,
            ok / proposed if proposed else None,
            same,
        )
        ms = {"ms_per_token": round(1e3 * median * concurrency / n_tokens, 4)}
        graph = _graph_ms(engines[(k, parts)], concurrency, k, mode != "greedy")
        ms["graph_ms"] = None if graph is None else round(graph[0], 4)  # the GPU's time for one step / round
        ms["graph_kernels"] = None if graph is None else graph[1]  # and its kernels, the largest by time
        ms["graph_top_kernels"] = None if graph is None else graph[2]
        ms.update(_loop_split(loops[(mode, (k, parts))], n_tokens * args.repeats))
        series = f"{mode}, {concurrency} in flight" + (f", {_label(parts)}" if parts else "")
        rows.append({"series": series, "concurrency": concurrency, **row, "rounds": _label(parts), **ms})
    return rows


def _loop_split(loop: list[float], tokens: int) -> dict[str, float]:
    """The engine loop's host split over the timed runs (`Engine.stats().loop`): tokens per iteration (an iteration
    launches one step or round and streams the one before), and microseconds per iteration launching, waiting for
    the GPU (the step before to finish: where the GPU, not the host, sets the pace) and streaming."""
    iterations, launch, wait, stream = loop
    n = max(iterations, 1)
    return {
        "tokens_per_iteration": round(tokens / n, 3),
        "launch_us": round(launch * 1e6 / n, 1),
        "wait_us": round(wait * 1e6 / n, 1),
        "stream_us": round(stream * 1e6 / n, 1),
    }


def _graph_ms(engine: Engine, concurrency: int, k: int, full: bool, replays: int = 50) -> tuple[float, int, str] | None:
    """Milliseconds of one replay of the engine's captured decode graph (k = 0: the plain resident step; else the
    speculative round) at this batch's bucket and the first attention span, its kernels per replay and the largest
    (us a replay, torch.profiler), timed by CUDA events with every row on the scratch slot (which stays at position 0: replays never run past the cache). None without CUDA graphs. Run
    on an idle engine: it rewrites the row -> slot map (the next step rewrites it back)."""
    runner = engine.runner
    target = runner.target if k else runner
    if not getattr(target, "cuda_graphs", False):
        return None
    b = next(x for x in batch_buckets(target.n_slots) if x >= concurrency)
    span = target._kv_buckets()[0]
    key = ("speculative", k, b, span, full, False) if k else ("resident", b, span, full)  # no penalty here
    graph = target._graphs[key].graph
    rows = [target._rows] if not k else [runner._rows, runner._draft_rows]
    for buf, model_runner in zip(rows, [target, runner.draft] if k else [target]):
        buf.fill_(model_runner._scratch)
    runner._rows_now = []  # the next real step lays its rows out again
    graph.replay()  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / replays
    kernels = replay_kernels(graph, 10)  # what a replay launches
    return ms, round(len(kernels) / 10), format_top(top_kernels(kernels, 10, n=12))


if __name__ == "__main__":
    sys.exit(main())
