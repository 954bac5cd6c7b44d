"""The kvcache suite on a tiny random-init model: cached decoding does less work at long contexts, and agrees."""

import dataclasses

from bench_svc import kvcache
from bench_svc.results_io import read_result


def test_context_lengths_double_up_to_the_block_size():
    assert kvcache.context_lengths(128) == [16, 32, 64, 128]
    assert kvcache.context_lengths(100) == [16, 32, 64, 100]
    assert kvcache.context_lengths(16) == [16]


def test_cached_decoding_beats_the_full_prefix_at_the_longest_context(tiny_ctx):
    events = []
    ctx = dataclasses.replace(tiny_ctx, progress=lambda m, f, x: events.append((m, f, dict(x))))
    result = kvcache.run(ctx)

    assert result.ok, result.status
    assert sorted(p.suffix for p in result.files) == [".csv", ".json", ".png"]
    doc = read_result(next(p for p in result.files if p.suffix == ".json"))
    rows = doc["rows"]
    assert [r["context_len"] for r in rows] == [16, 32, 64, 128]
    longest = rows[-1]
    # The cached step runs one token through the linear layers, the uncached one the whole prefix: counted FLOPs
    # (not the clock, which shared CI cores make noisy) show the speed-up's cause.
    assert longest["flop_ratio"] > 1 and longest["gflop_per_token_no_cache"] > longest["gflop_per_token_cached"]
    assert rows[0]["flop_ratio"] < longest["flop_ratio"]
    # Both ways decode the same token: the logits agree.
    assert all(r["max_abs_logit_diff"] < 1e-4 for r in rows)
    assert all(r["tokens_per_s_cached"] > 0 and r["tokens_per_s_no_cache"] > 0 for r in rows)
    assert doc["header"]["anchor"]["name"].startswith("no KV cache")
    assert doc["header"]["anchor"]["value"] == longest["tokens_per_s_no_cache"]
    assert result.summary["flop_ratio_at_longest"] == longest["flop_ratio"]

    # Progress: one event per context length, with rate and ETA, fractions rising to 1.
    assert len(events) == 4 and events[-1][1] == 1.0
    assert all("rate" in e[2] and "eta_s" in e[2] and "ETA" in e[0] for e in events)
