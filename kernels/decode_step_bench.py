"""One decode step captured in a CUDA graph, with and without the small-batch kernels: ms per replay, kernels per
replay, and whether both give the same logits and greedy tokens.

    python -m kernels.decode_step_bench [--preset shakespeare-char] [--batches 1,8] [--position 128] [--json out.json]

The step is what the serving engine's device-resident greedy graph runs around the model (`GPT.forward_cached` with
attention in place, logits to float32, argmax into a static buffer), minus the engine's own state bookkeeping. The
model has random weights at a realistic scale (GPT init, then every weight moved by 0.05 randn and the norm weights
scaled by 1 + 0.3 randn, as training leaves them) in bf16; the cache holds a real prefill of `position` random tokens
per row, so attention reads `position` + 1 keys. Each replay rewrites the same cache position, so replays are
identical. Kernels are counted with torch.profiler over replays; the table lists ms, kernels and the largest kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter

import torch

from tools.profiling import replay_kernels

REPLAYS = 200  # per timing round
ROUNDS = 5  # median of rounds
PROFILED_REPLAYS = 10


def _model(preset: str):
    from model.presets import get_preset  # model imports kernels: imported here, not at module load
    from model.testing import perturb_like_training
    from model.transformer import GPT

    torch.manual_seed(0)
    model = perturb_like_training(GPT(get_preset(preset, dropout=0.0))).to("cuda", torch.bfloat16).eval()
    model.fuse_qkv()
    return model


def _prefilled_cache(model, batch: int, position: int):
    from model.kv_cache import KVCache

    cache = KVCache(batch + 1, model.config, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(1, batch + 1, device="cuda")  # not slot 0: rows read their slot, wherever it is
    if position:
        prompts = torch.randint(model.config.vocab_size, (batch, position), device="cuda")
        with torch.inference_mode():
            model.forward_cached(prompts, cache, slots, torch.zeros_like(slots))
    return cache, slots


def _capture(step):
    """Warm up on a side stream (compiles, autotunes), then capture one call of `step` in a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph) -> float:
    """Milliseconds per replay of a captured graph: the median of ROUNDS rounds of REPLAYS back-to-back replays."""
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / REPLAYS)
    return statistics.median(times)


def _kernels(graph) -> tuple[float, list[tuple[str, float, float]]]:
    """Kernels per replay, and the largest by device time: (name, launches per replay, us per replay)."""
    events = replay_kernels(graph, PROFILED_REPLAYS)
    count, time_us = Counter(), Counter()
    for e in events:
        count[e.name[:44]] += 1
        time_us[e.name[:44]] += e.device_time
    top = [(name, count[name] / PROFILED_REPLAYS, us / PROFILED_REPLAYS) for name, us in time_us.most_common(8)]
    return len(events) / PROFILED_REPLAYS, top


def measure(model, batch: int, position: int, small_batch_kernels: bool) -> dict:
    cache, slots = _prefilled_cache(model, batch, position)
    tokens = torch.randint(model.config.vocab_size, (batch, 1), device="cuda", generator=None)
    positions = torch.full((batch,), position, dtype=torch.long, device="cuda")
    span = cache.max_len
    logits_out = torch.zeros(batch, model.config.vocab_size, device="cuda")
    ids_out = torch.zeros(batch, dtype=torch.long, device="cuda")

    def step() -> None:
        with torch.inference_mode():
            logits = model.forward_cached(
                tokens,
                cache,
                slots,
                positions,
                kv_len=span,
                attention_in_place=True,
                small_batch_kernels=small_batch_kernels,
            )[:, 0].float()  # (B, V)
            logits_out.copy_(logits)
            ids_out.copy_(logits.argmax(-1))

    graph = _capture(step)
    ms = replay_ms(graph)
    kernels, top = _kernels(graph)
    graph.replay()
    torch.cuda.synchronize()
    # The bookkeeping copy into logits_out is the bench's, not the engine's: one kernel of the count.
    return dict(ms=ms, kernels=kernels, top=top, logits=logits_out.clone(), ids=ids_out.clone(), tokens=tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.decode_step_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--position", type=int, default=128, help="cached tokens per row before the step")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    model = _model(args.preset)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(batch)
        off = measure(model, batch, args.position, False)
        torch.manual_seed(batch)  # the same tokens for both
        on = measure(model, batch, args.position, True)
        assert torch.equal(on["tokens"], off["tokens"])
        diff = (on["logits"] - off["logits"]).abs().max().item()
        agree = (on["ids"] == off["ids"]).float().mean().item()
        for name, r in (("off", off), ("on", on)):
            print(f"\n[B={batch} small_batch_kernels {name}] {r['ms']:.4f} ms, {r['kernels']:.0f} kernels per replay")
            for kname, n, us in r["top"]:
                print(f"    {kname:<44} x{n:<4.0f} {us:7.1f} us")
        rows.append(
            dict(
                preset=args.preset,
                batch=batch,
                position=args.position,
                ms_off=off["ms"],
                ms_on=on["ms"],
                kernels_off=off["kernels"],
                kernels_on=on["kernels"],
                speedup=off["ms"] / on["ms"],
                max_abs_logit_diff=diff,
                argmax_agreement=agree,
                device=torch.cuda.get_device_name(),
            )
        )
    print(f"\n{args.preset}, bf16, CUDA graph per step, position {args.position} (random trained-like weights)")
    print(
        f"{'B':>3} {'ms off':>8} {'ms on':>8} {'speedup':>8} {'kern off':>9} {'kern on':>8} {'max|dlogit|':>12} {'argmax=':>8}"
    )
    for r in rows:
        print(
            f"{r['batch']:>3} {r['ms_off']:>8.4f} {r['ms_on']:>8.4f} {r['speedup']:>7.2f}x {r['kernels_off']:>9.0f} "
            f"{r['kernels_on']:>8.0f} {r['max_abs_logit_diff']:>12.4f} {r['argmax_agreement']:>8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
