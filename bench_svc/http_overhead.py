"""What the OpenAI-compatible HTTP API costs next to gRPC: one inference server, the same streaming load through both.

    .venv/bin/python -m bench_svc.http_overhead [--concurrency 1,4,8] [--max-new-tokens 64] [--rounds 4] [--threads 1]

It saves a random-init shakespeare-char artifact (speed does not depend on the weights' values), starts
`python -m inference_svc.main serve --http-port` on loopback, and at each concurrency runs the gRPC load generator
and its HTTP twin (bench_svc/http_load.py: server-sent events read by the `openai` client, and by a bare httpx2 +
json client) back to back for `--rounds` rounds, the order rotating each round. Per level: tokens/s (all tokens
over all rounds' wall time) and TTFT p50/p95 of each side, and each HTTP side's ratio to gRPC as the median of the
rounds' ratios (a shared machine's load swings between rounds more than within one). Writes http-overhead-<device>.{csv,json,png} with the device, commit
and command (bench_svc/results_io.py).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from bench_svc.http_load import run_http_level
from bench_svc.load_generator import LoadLevel, LoadResult, percentile, run_level
from bench_svc.local_server import INFERENCE_MODULE
from bench_svc.provenance import machine_load
from bench_svc.results_io import Anchor, Panel, PlotSpec, device_name, git_commit, make_header, write_results
from bench_svc.subprocess_suite import stop_process
from model.artifact import save_artifact
from model.presets import get_preset
from model.tokenizers import CharTokenizer
from model.transformer import GPT

__all__ = ["NAME", "main"]

NAME = "http-overhead"
PRESET = "shakespeare-char"
MODEL_NAME = "bench-shakespeare-char"
TARGET_RATIO = 0.8  # HTTP within 20% of gRPC: tokens/s at least 0.8x, TTFT at most 1.25x
ROOT = Path(__file__).resolve().parent.parent
SIDES = ("grpc", "http", "http_raw")  # http: the openai client; http_raw: httpx2 + json
SIDE_CLIENT = {"http": "openai", "http_raw": "raw"}
LABELS = {"grpc": "gRPC", "http": "HTTP, openai client", "http_raw": "HTTP, bare client"}


def _artifact(store: Path) -> Path:
    text = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65 characters
    tokenizer = CharTokenizer.from_corpus(text)
    torch.manual_seed(0)
    model = GPT(get_preset(PRESET, vocab_size=tokenizer.vocab_size, dropout=0.0))
    return store / save_artifact(store, model, tokenizer, name=MODEL_NAME, preset=PRESET)


@contextlib.contextmanager
def _server(model: Path, max_slots: int, threads: int) -> Iterator[tuple[str, str]]:
    """The inference service's own entry point with --http-port; yields (gRPC address, HTTP base URL)."""
    argv = [
        sys.executable,
        "-m",
        INFERENCE_MODULE,
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        "0",
        "--max-slots",
        str(max_slots),
        "--threads",
        str(threads),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        grpc_line, http_line = proc.stdout.readline(), proc.stdout.readline()
        address = re.search(r" on (\S+)$", grpc_line.strip())
        url = re.search(r"http on (http://\S+) ", http_line)
        if not (address and url):
            raise RuntimeError(f"the server did not start: {grpc_line!r} {http_line!r}")
        yield address.group(1), url.group(1)
    finally:
        stop_process(proc)


def _side(results: list[LoadResult]) -> dict[str, float]:
    """Tokens/s over all rounds (all tokens / all wall time) and TTFT percentiles over all requests."""
    records = [r for res in results for r in res.records]
    ok = [r for r in records if not r.error]
    ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    itl = [g * 1e3 for r in ok for g in r.inter_token_s]
    wall = sum(res.wall_s for res in results)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "tokens": sum(r.tokens for r in ok),
        "tokens_per_s": sum(r.tokens for r in ok) / wall,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p95_ms": percentile(ttft, 95),
        "itl_p50_ms": percentile(itl, 50),
    }


def measure(address: str, url: str, concurrency: int, max_new_tokens: int, rounds: int) -> dict[str, float]:
    """One row: gRPC, HTTP through the openai client and HTTP through a bare client, back to back, for `rounds`
    rounds at `concurrency` streams (the order rotating each round).

    The ratios are the median over rounds of an HTTP figure over the gRPC figure of the same round: on a machine
    others share, a round's runs see about the same load, while load swings between rounds."""
    level = LoadLevel(
        concurrency,
        requests=max(2 * concurrency, 4),
        max_new_tokens=max_new_tokens,
        time_budget_s=600.0,
        request_timeout_s=600.0,
    )
    runs: dict[str, list[LoadResult]] = {side: [] for side in SIDES}
    for i in range(rounds):
        for side in SIDES[i % len(SIDES) :] + SIDES[: i % len(SIDES)]:
            if side == "grpc":
                runs[side].append(run_level(address, level))
            else:
                runs[side].append(run_http_level(url, MODEL_NAME, level, client=SIDE_CLIENT[side]))
    row: dict[str, float] = {
        "concurrency": concurrency,
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "requests_each": sum(len(r.records) for r in runs["grpc"]),
    }
    for side in SIDES:
        row.update({f"{side}_{k}": v for k, v in _side(runs[side]).items() if k != "requests"})
    for side in SIDES[1:]:
        pairs = [(_side([g]), _side([h])) for g, h in zip(runs["grpc"], runs[side])]
        tps = statistics.median(h["tokens_per_s"] / g["tokens_per_s"] for g, h in pairs)
        ttft = statistics.median(h["ttft_p50_ms"] / g["ttft_p50_ms"] for g, h in pairs)
        row[f"{side}_over_grpc_tokens_per_s"] = tps
        row[f"{side}_over_grpc_ttft_p50"] = ttft
        row[f"{side}_meets_target"] = tps >= TARGET_RATIO and ttft <= 1 / TARGET_RATIO
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench_svc.http_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated stream counts (default 1,4,8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="gRPC/HTTP pairs per level (default 4)")
    p.add_argument(
        "--threads", type=int, default=1, help="the server's torch threads (default 1: the client gets a core)"
    )
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "bench_svc" / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    commit = git_commit(ROOT)  # taken at the start: the code that measured
    load_before = machine_load()
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model = _artifact(Path(tmp))
        with _server(model, args.max_slots, args.threads) as (address, url):
            measure(address, url, 2, 8, 1)  # warm-up: both paths, both connections
            for c in levels:
                rows.append(measure(address, url, c, args.max_new_tokens, args.rounds))
                r = rows[-1]
                print(
                    f"concurrency {c}: "
                    + " | ".join(
                        f"{side} {r[side + '_tokens_per_s']:.0f} tok/s TTFT p50 {r[side + '_ttft_p50_ms']:.1f} ms"
                        for side in SIDES
                    )
                    + f" | ratios {r['http_over_grpc_tokens_per_s']:.3f} {r['http_raw_over_grpc_tokens_per_s']:.3f}",
                    flush=True,
                )
    anchor = Anchor(f"gRPC Generate streaming, concurrency {levels[0]}", rows[0]["grpc_tokens_per_s"], "tok/s")
    command = [".venv/bin/python", "-m", "bench_svc.http_overhead", *argv]
    header = make_header(device_name("cpu"), ROOT, command, anchor, commit=commit)
    summary = {
        "model": f"{PRESET} (random init), char tokenizer, torch cpu float32",
        "server_threads": args.threads,
        "clients": "grpc: bench_svc.load_generator; http: bench_svc.http_load with the openai client; http_raw: the same "
        "with httpx2 + json (the protocol without the openai client's parsing); same requests on one server",
        "target": f"HTTP tokens/s >= {TARGET_RATIO} x gRPC and TTFT p50 <= {1 / TARGET_RATIO:.2f} x gRPC",
        **{
            f"{side}_worst_tokens_per_s_ratio": min(r[f"{side}_over_grpc_tokens_per_s"] for r in rows)
            for side in SIDES[1:]
        },
        **{f"{side}_worst_ttft_p50_ratio": max(r[f"{side}_over_grpc_ttft_p50"] for r in rows) for side in SIDES[1:]},
        **{f"{side}_meets_target": all(r[f"{side}_meets_target"] for r in rows) for side in SIDES[1:]},
        "load_average_before": load_before,  # 1-minute; the header has it too, when the run ends
        "load_average_after": machine_load(),
        "wall_s": time.monotonic() - started,
    }
    plot = PlotSpec(
        title="HTTP (OpenAI SSE) vs gRPC streaming, one server",
        x="concurrency",
        x_label="concurrent streams",
        panels=(
            Panel("tokens/s", tuple((f"{side}_tokens_per_s", LABELS[side]) for side in SIDES)),
            Panel("TTFT p50 (ms)", tuple((f"{side}_ttft_p50_ms", LABELS[side]) for side in SIDES)),
        ),
    )
    for path in write_results(args.out, NAME, header, rows, summary=summary, plot=plot):
        print(path)
    errors = sum(r[f"{side}_errors"] for r in rows for side in SIDES)
    if errors:  # their time counts in the wall time: the figures of that level are low
        print(f"{errors} requests failed (the errors columns say where)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
