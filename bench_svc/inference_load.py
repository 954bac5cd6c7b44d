"""Suite `inference`: streaming load on an InferenceService at rising concurrency.

For each concurrency level (1 first: the anchor, the same load from one client, measured in the same run) it
runs the bounded load generator and records TTFT and inter-token latency p50/p95/p99, aggregate tokens/s and
errors. The server is `ctx.inference_address` (loopback only), else a throw-away local one started from the
inference service's entry point.
"""

from __future__ import annotations

import contextlib
import threading
import time

from bench_svc.load_generator import LoadLevel, LoadResult, run_level
from bench_svc.loopback import check_loopback
from bench_svc.provenance import machine_load
from bench_svc.local_server import inference_server
from bench_svc.results_io import Anchor, Panel, PlotSpec, write_results
from bench_svc.suite import RateProgress, SuiteContext, SuiteResult

__all__ = ["NAME", "levels", "run"]

NAME = "inference"


def levels(quick: bool) -> list[LoadLevel]:
    """The load levels of a run, concurrency 1 (the anchor) first."""
    if quick:
        return [LoadLevel(c, requests=max(2 * c, 3), max_new_tokens=16, time_budget_s=30.0) for c in (1, 4)]
    return [LoadLevel(c, requests=max(4 * c, 8), max_new_tokens=64, time_budget_s=120.0) for c in (1, 2, 4, 8)]


def _run_cancellable(ctx: SuiteContext, address: str, level: LoadLevel) -> LoadResult:
    """run_level in a thread, stopped as soon as the caller cancels."""
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = run_level(address, level, stop)
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if ctx.cancelled():
            stop.set()
    ctx.check_cancelled()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _server(ctx: SuiteContext) -> contextlib.AbstractContextManager[str]:
    if ctx.inference_address:
        check_loopback(ctx.inference_address)
        return contextlib.nullcontext(ctx.inference_address)
    return inference_server(ctx.python, ctx.repo_root, ctx.model_path)


def run(ctx: SuiteContext) -> SuiteResult:
    """Runs every load level; writes inference-<device>.{csv,json,png}."""
    start = time.monotonic()
    plan = levels(ctx.quick)
    progress = RateProgress(ctx, NAME, len(plan), unit="level")
    rows = []
    try:
        with _server(ctx) as address:
            for level in plan:
                result = _run_cancellable(ctx, address, level)
                row = {"address": address, **result.summary(), "load_1m": machine_load()}
                rows.append(row)
                progress.advance(
                    f"concurrency {level.concurrency}: {row['tokens_per_s']:.1f} tok/s, "
                    f"TTFT p50 {row['ttft_p50_ms']:.1f} ms, {row['errors']} errors",
                    tokens_per_s=row["tokens_per_s"],
                )
    except RuntimeError as err:  # the local server did not start
        return SuiteResult(NAME, f"failed: {err}", (), {}, time.monotonic() - start)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["throughput_vs_c1"] = row["tokens_per_s"] / base if base > 0 else float("nan")
    top = max(rows, key=lambda r: r["tokens_per_s"])
    anchor = Anchor("the same load at concurrency 1 (one streaming client)", base, "tokens/s")
    summary = {
        "address": rows[0]["address"],
        "tokens_per_s_c1": base,
        "best_tokens_per_s": top["tokens_per_s"],
        "best_concurrency": top["concurrency"],
        "ttft_p50_ms_c1": rows[0]["ttft_p50_ms"],
        "errors": sum(r["errors"] for r in rows),
    }
    plot = PlotSpec(
        title="InferenceService under streaming load",
        x="concurrency",
        x_label="concurrent streaming clients",
        log_x=True,
        panels=(
            Panel("tokens / s (all clients)", (("tokens_per_s", "aggregate tokens/s"),)),
            Panel(
                "ms",
                (
                    ("ttft_p50_ms", "TTFT p50"),
                    ("ttft_p95_ms", "TTFT p95"),
                    ("itl_p50_ms", "inter-token p50"),
                    ("itl_p95_ms", "inter-token p95"),
                ),
                log_y=True,
            ),
        ),
    )
    files = write_results(ctx.out_dir, NAME, ctx.header(anchor), rows, summary=summary, plot=plot)
    return SuiteResult(NAME, "ok", tuple(files), summary, time.monotonic() - start)
