"""The kvcache suite on a tiny random-init model: cached decoding does less work at long contexts, and agrees."""

import dataclasses

import pytest

from bench_svc import kvcache
from bench_svc.results_io import read_result
from model.transformer import GPT


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


class _FakeClock:
    """A stand-in for time.perf_counter that only moves when a stand-in cost is charged: timings become exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_median_seconds_leaves_the_warm_up_calls_out(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(kvcache.time, "perf_counter", clock)
    calls = []

    def step():  # the first 3 calls cost 10 s each (compilation, allocation), then 1 ms
        calls.append(1)
        clock.now += 10.0 if len(calls) <= 3 else 1e-3

    assert kvcache._median_seconds(step, reps=3, sync=lambda: None) == pytest.approx(1e-3)
    assert len(calls) == kvcache.WARMUP_CALLS + 3


def test_first_row_does_not_pay_the_suites_warm_up(tiny_ctx, monkeypatch):
    """The first calls of each decoding path cost 10 s (one-off set-up, as the demo's first row once paid: cached
    decoding 130x slower than uncached at context 16); every later call 1 ms. No timed row may include them."""
    clock = _FakeClock()
    monkeypatch.setattr(kvcache.time, "perf_counter", clock)
    expensive_calls = 6  # the suite's warm-up and a row's own cover it; one warm-up call per function (before) did not
    for name in ("forward", "forward_cached"):
        real = getattr(GPT, name)
        seen = []

        def charged(self, *args, _real=real, _seen=seen, **kwargs):
            _seen.append(1)
            clock.now += 10.0 if len(_seen) <= expensive_calls else 1e-3
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(GPT, name, charged)
    monkeypatch.setattr(kvcache, "_flops", lambda step: 1)  # FLOP counting calls the model too; not what is tested
    result = kvcache.run(tiny_ctx)
    assert result.ok, result.status
    rows = read_result(next(p for p in result.files if p.suffix == ".json"))["rows"]
    for row in rows:
        assert row["ms_per_token_cached"] == pytest.approx(1.0) and row["ms_per_token_no_cache"] == pytest.approx(1.0)
