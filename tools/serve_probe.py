"""GPU diagnostics for the serving engine: where a decode step's time goes.

    python -m tools.serve_probe [--batches 1,256] [--new-tokens 128] [--slots 256] [--sampled] [--gather]
    python -m tools.serve_probe --host-only [--batches 1,256]   # any machine: the engine's host-side ceiling

For each batch size B: B requests with prompts of one length submitted at once to an `Engine` over a `TorchRunner`
(shakespeare-char, random weights, bf16, CUDA graphs), run to their end under torch.profiler. Reported per decode
step (a step = one token per row; multi-step decode makes several per graph launch): wall ms (the engine's, submit to its last token), GPU-busy ms (the union of
kernel intervals), kernels, and the largest kernels; then the captured decode graph alone: replay ms and kernels per replay, no engine around it.
A diagnostic tool, not a benchmark: it prints tables; the figures go into notes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
import torch

from inference_svc.engine import Engine
from kernels.decode_step_bench import replay_ms
from inference_svc.params import Request
from inference_svc.runner import SlotState, TorchRunner
from model.presets import get_preset
from model.sampling import SamplingParams
from model.tokenizers import CharTokenizer
from model.transformer import GPT
from tools.profiling import busy_us, format_top, kernel_events, replay_kernels, top_host, top_kernels


def _top(kernels: list, per: int) -> str:
    return format_top(top_kernels(kernels, per))


def _graph_launches(prof) -> int:
    return sum(1 for e in prof.events() if e.name in ("cudaGraphLaunch", "cuGraphLaunch"))


def engine_probe(
    runner: TorchRunner, tokenizer, batch: int, new_tokens: int, sampled: bool, decode_steps: int | None = None
) -> dict:
    params = (
        SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=1)
        if sampled
        else SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [tuple(torch.randint(0, 60, (16,), generator=gen).tolist()) for _ in range(batch)]
    with Engine(runner, tokenizer, max_queue=batch, decode_steps=decode_steps) as engine:
        for _ in range(2):  # warm-up: every graph this batch uses, the sampler, the threads
            [h.result() for h in engine.submit_many([Request(p, params) for p in prompts])]
        # Unprofiled first: the loop's own split of its host time (Engine.stats().loop), and the bench's ms/token
        before = engine.stats().loop
        plain = [h.result() for h in engine.submit_many([Request(p, params) for p in prompts])]
        split = _loop_split(before, engine.stats().loop)
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            handles = engine.submit_many([Request(p, params) for p in prompts])  # all in before the first step
            finals = [h.result() for h in handles]
    # The engine's time, submit to its last token (this thread reads the streams after; at 256 streams one reader
    # is slower than the engine, so the reader's wall time would not be the engine's)
    wall = max(f.timings.token_ms[-1] for f in finals) / 1e3
    tokens = sum(len(f.token_ids) for f in finals)
    kernels = kernel_events(prof)
    # a step = one token per row (multi-step decode launches several per graph, or several graphs per engine step)
    steps = max(len(f.token_ids) for f in finals)
    return {
        "batch": batch,
        "sampled": sampled,
        "tokens_per_s": tokens / wall,
        "steps": steps,
        "wall_ms_per_step": wall * 1e3 / steps,
        "busy_ms_per_step": busy_us(kernels) / 1e3 / steps,
        "kernels_per_step": len(kernels) / steps,
        "launches_per_step": _graph_launches(prof) / steps,
        "top_kernels": _top(kernels, steps),
        "top_host": format_top(top_host(prof, steps)),
        # unprofiled: mean gap between a request's tokens (the serving bench's batch-1 figure), the loop's split
        "itl_ms": statistics.median(f.timings.mean_inter_token_ms for f in plain),
        **split,
    }


def _loop_split(before, after) -> dict:
    """Per engine iteration that launched work: host microseconds launching, waiting on the GPU, streaming."""
    n = max(after.iterations - before.iterations, 1)
    return {
        "iterations": after.iterations - before.iterations,
        "launch_us": (after.launch_s - before.launch_s) * 1e6 / n,
        "wait_us": (after.wait_s - before.wait_s) * 1e6 / n,
        "stream_us": (after.stream_s - before.stream_s) * 1e6 / n,
    }


def graph_probe(runner: TorchRunner, batch: int, full: bool) -> dict | None:
    """The smallest-span captured device-resident decode graph of this batch bucket (greedy-only or full
    sampling), replayed alone, with every row on the scratch slot."""
    keys = sorted(k for k in runner._graphs if k[0] == "resident" and k[1] == batch and k[3] == full and len(k) == 4)
    if not keys:
        return None
    graph = runner._graphs[keys[0]].graph
    ms = _replay_ms(runner, graph)
    kernels = replay_kernels(graph, 10)
    return {
        "key": keys[0],
        "replay_ms": ms,
        "kernels": len(kernels) / 10,
        "top_kernels": _top(kernels, 10),
    }


def _replay_ms(runner: TorchRunner, graph: torch.cuda.CUDAGraph) -> float:
    """Milliseconds per replay of a captured decode graph with every row on the scratch slot (the replays advance no
    real sequence)."""
    runner._rows.fill_(runner._scratch)
    runner._rows_now = []
    return replay_ms(graph)


def span_probe(runner: TorchRunner, batch: int) -> list[tuple[int, int, float]]:
    """(attention span, steps, ms per step) of every greedy device-resident decode graph of this batch bucket: what a
    step costs as a request's span grows (a multi-step graph attends over the span of its last step)."""
    keys = sorted(k for k in runner._graphs if k[0] == "resident" and k[1] == batch and not k[3])
    out = []
    for key in keys:
        steps = key[4] if len(key) > 4 else 1  # a multi-step graph's key has its step count last
        out.append((key[2], steps, _replay_ms(runner, runner._graphs[key].graph) / steps))
    return out


def prefill_probe(runner: TorchRunner, batch: int, length: int, repeats: int = 5) -> dict:
    """One eager prefill of `batch` prompts of `length` tokens (`prefill_sample`, as the engine launches it): the
    host's time to launch it (the engine thread's cost: the decode streams wait for it) and to its end on the GPU."""
    gen = torch.Generator().manual_seed(1)
    prompts = [tuple(torch.randint(0, 60, (length,), generator=gen).tolist()) for _ in range(batch)]
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, seed=b) for b in range(batch)]
    slots = list(range(batch))
    launch, done = [], []
    for _ in range(repeats + 1):  # the first: warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.prefill_sample(slots, prompts, params, list(range(batch)))
        launch.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - t0)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        runner.prefill_sample(slots, prompts, params, list(range(batch)))
        torch.cuda.synchronize()
    calls = cProfile.Profile()
    calls.enable()
    runner.prefill_sample(slots, prompts, params, list(range(batch)))
    torch.cuda.synchronize()
    calls.disable()
    by_time = io.StringIO()
    pstats.Stats(calls, stream=by_time).sort_stats("tottime").print_stats(12)
    return {
        "batch": batch,
        "length": length,
        "launch_ms": min(launch[1:]) * 1e3,
        "done_ms": min(done[1:]) * 1e3,
        "kernels": len(kernel_events(prof)),
        "top_host": ", ".join(f"{name} {us:.0f}us" for name, us in top_host(prof, 1, n=12, width=48)),
        "python": by_time.getvalue(),
    }


class InstantRunner:
    """The device-resident runner's calls with no model behind them (every call returns at once): an engine over it
    runs at the ceiling its host-side work allows, on any machine."""

    def __init__(self, n_slots: int, max_len: int = 256, vocab_size: int = 65) -> None:
        self.n_slots, self.max_len, self.vocab_size, self.device = n_slots, max_len, vocab_size, torch.device("cpu")
        self.state = SlotState(1, vocab_size, self.device)
        self._ids = torch.arange(n_slots) % (vocab_size - 5) + 1

    def prefill_sample(self, slots, prompts, params, seeds, starts=None) -> torch.Tensor:
        return self._ids[: len(slots)].clone()

    def decode_sample(self, slots, kv_len: int, full: bool, steps: int = 1) -> torch.Tensor:
        return self._ids[: len(slots)] if steps == 1 else self._ids[: len(slots)].expand(steps, -1)

    def extend(self, slots, chunks, starts, **kw) -> None:
        return None

    def capture_graphs(self, steps=1) -> None:
        return None

    def release(self, slot: int) -> None:
        return None


def host_ceiling(batch: int, new_tokens: int, repeats: int = 5, decode_steps: int | None = None) -> float:
    """Tokens/s of an engine over `InstantRunner`: `batch` greedy requests at once (best of `repeats`)."""
    tokenizer = CharTokenizer([chr(32 + i) for i in range(65)])
    prompts = [tuple(range(1, 17))] * batch
    best = 0.0
    with Engine(InstantRunner(batch), tokenizer, max_queue=batch, decode_steps=decode_steps) as engine:
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
            handles = engine.submit_many([Request(p, params) for p in prompts])  # full batches from the first step
            for h in handles:
                h.result()
            best = max(best, batch * new_tokens / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.serve_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,256")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--sampled", action="store_true", help="also run sampled requests (T 0.8, top-k 50, top-p 0.95)")
    p.add_argument("--gather", action="store_true", help="decode attention by gather + SDPA (not in place)")
    p.add_argument(
        "--small-batch-kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused small-batch decode kernels (TorchRunner option; default: the runner's, on with CUDA)",
    )
    p.add_argument(
        "--multi-step-max-batch",
        type=int,
        default=None,
        help="TorchRunner option: the largest batch bucket whose decode steps replay as one graph (default: the runner's)",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help="decode steps per engine step (Engine option; default: the engine's, 4 with CUDA graphs, else 1)",
    )
    p.add_argument(
        "--host-only",
        action="store_true",
        help="no GPU: the engine's host-side ceiling over a runner that returns at once (tokens/s, us per token)",
    )
    args = p.parse_args(argv)
    if args.host_only:
        print(f"{'B':>4} {'host tok/s':>11} {'us/token':>9}")
        for b in (int(x) for x in args.batches.split(",")):
            rate = host_ceiling(b, args.new_tokens, decode_steps=args.decode_steps)
            print(f"{b:>4} {rate:>11,.0f} {1e6 / rate:>9.2f}")
        return 0
    torch.manual_seed(0)
    tokenizer = CharTokenizer([chr(32 + i) for i in range(65)])  # Tiny Shakespeare's vocabulary size
    config = get_preset("shakespeare-char", vocab_size=tokenizer.vocab_size, dropout=0.0)
    t0 = time.perf_counter()
    runner = TorchRunner(
        GPT(config),
        args.slots,
        device="cuda",
        attention_in_place=not args.gather,
        small_batch_kernels=args.small_batch_kernels,
        **({} if args.multi_step_max_batch is None else {"multi_step_max_batch": args.multi_step_max_batch}),
    )
    print(f"runner ready in {time.perf_counter() - t0:.1f} s ({len(runner._graphs)} graphs)")
    rows, graphs = [], []
    for b in (int(x) for x in args.batches.split(",")):
        for sampled in (False, True) if args.sampled else (False,):
            r = engine_probe(runner, tokenizer, b, args.new_tokens, sampled, args.decode_steps)
            print(f"\n[engine B={b} {'sampled' if sampled else 'greedy'}] kernels: {r['top_kernels']}")
            print(f"[engine B={b}] host: {r['top_host']}")
            rows.append(r)
        spans = span_probe(runner, b)
        print(f"\n[graphs B={b} greedy] ms per step by (span, steps): "
              + ", ".join(f"({span}, {steps}) {ms:.4f}" for span, steps, ms in spans))  # fmt: skip
        for full in (False, True):
            g = graph_probe(runner, b, full)
            if g:
                print(f"\n[graph {g['key']}] {g['replay_ms']:.3f} ms, {g['kernels']:.0f} kernels: {g['top_kernels']}")
                graphs.append((b, full, g))
    prefills = [prefill_probe(runner, b, n) for b, n in ((1, 24), (16, 24), (256, 24))]
    for r in prefills:
        print(f"\n[prefill B={r['batch']} T={r['length']}] {r['kernels']} kernels; host: {r['top_host']}")
    print(f"\n[prefill B={prefills[0]['batch']}] Python, by own time:\n{prefills[0]['python']}")
    print(
        f"\n{'B':>4} {'mode':>8} {'tok/s':>10} {'wall ms':>8} {'busy ms':>8} {'kern/step':>9} {'graphs/step':>11} {'steps':>6}"
    )
    print(
        f"\nunprofiled: {'B':>4} {'mode':>8} {'ITL ms':>8} {'iterations':>10} {'launch us':>9} {'wait us':>8} {'stream us':>9}"
    )
    for r in rows:
        print(
            f"{'':>11} {r['batch']:>4} {'sampled' if r['sampled'] else 'greedy':>8} {r['itl_ms']:>8.4f} "
            f"{r['iterations']:>10} {r['launch_us']:>9.1f} {r['wait_us']:>8.1f} {r['stream_us']:>9.1f}"
        )
    print("(per iteration that launched work; wait ~0: the host bounds the loop, the GPU idles between launches)")
    for r in rows:
        print(
            f"{r['batch']:>4} {'sampled' if r['sampled'] else 'greedy':>8} {r['tokens_per_s']:>10,.0f} "
            f"{r['wall_ms_per_step']:>8.3f} {r['busy_ms_per_step']:>8.3f} {r['kernels_per_step']:>9.1f} "
            f"{r['launches_per_step']:>11.2f} {r['steps']:>6}"
        )
    print(f"\n{'graph':>14} {'replay ms':>10} {'kernels':>8}")
    for b, full, g in graphs:
        print(f"{f'B={b} ' + ('full' if full else 'greedy'):>14} {g['replay_ms']:>10.3f} {g['kernels']:>8.0f}")
    print(f"\n{'prefill':>14} {'host launch ms':>15} {'to GPU end ms':>14}")
    for r in prefills:
        shape = f"B={r['batch']} T={r['length']}"
        print(f"{shape:>14} {r['launch_ms']:>15.3f} {r['done_ms']:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
