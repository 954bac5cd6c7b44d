"""The load generator against a real gRPC InferenceService servicer: counts, timings, errors, bounds, loopback."""

import math
import threading

import pytest

from bench_svc.load_generator import LoadLevel, percentile, run_level


def test_percentile_interpolates_and_is_nan_for_nothing():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([10.0, 20.0], 95) == pytest.approx(19.5)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_level_validation_names_the_field():
    with pytest.raises(ValueError, match="concurrency"):
        LoadLevel(0, requests=1, max_new_tokens=1, time_budget_s=1)
    with pytest.raises(ValueError, match="requests"):
        LoadLevel(4, requests=2, max_new_tokens=1, time_budget_s=1)


def test_concurrent_clients_stream_every_token(counting_server):
    address, servicer = counting_server
    level = LoadLevel(concurrency=3, requests=7, max_new_tokens=5, time_budget_s=60)
    result = run_level(address, level)
    row = result.summary()
    assert servicer.calls == 7 and row["requests"] == 7 and row["errors"] == 0
    assert row["tokens"] == 35 and all(r.tokens == 5 for r in result.records)
    # one TTFT per request, four inter-token gaps after each first token
    assert all(r.ttft_s is not None and len(r.inter_token_s) == 4 for r in result.records)
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"] <= row["ttft_p99_ms"]
    assert 0 < row["itl_p50_ms"] <= row["itl_p95_ms"] <= row["itl_p99_ms"]
    assert row["tokens_per_s"] == pytest.approx(35 / result.wall_s)
    assert servicer.max_active >= 2  # the clients really overlapped


def test_failed_generations_are_counted_as_errors(counting_server):
    address, servicer = counting_server
    servicer.fail_every = 2
    result = run_level(address, LoadLevel(concurrency=2, requests=6, max_new_tokens=3, time_budget_s=60))
    assert result.errors == 3 and sum(1 for r in result.records if r.error == "refused") == 3
    assert result.summary()["requests_per_s"] == pytest.approx(3 / result.wall_s)


def test_the_time_budget_and_stop_bound_a_level(counting_server):
    address, servicer = counting_server
    servicer.token_delay_s = 0.05
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    result = run_level(address, LoadLevel(concurrency=2, requests=1000, max_new_tokens=50, time_budget_s=60), stop)
    assert len(result.records) <= 4 and servicer.calls <= 4
    # The stop cut the streams short (no request ran to its 50 tokens) rather than waiting them out.
    assert result.records and all(r.error == "cancelled" and r.tokens < 50 for r in result.records)

    servicer.token_delay_s = 0.002
    result = run_level(address, LoadLevel(concurrency=1, requests=1000, max_new_tokens=5, time_budget_s=0.2))
    assert 1 <= len(result.records) < 1000


def test_refuses_a_remote_address():
    with pytest.raises(ValueError, match="loopback"):
        run_level("192.0.2.1:50051", LoadLevel(1, requests=1, max_new_tokens=1, time_budget_s=1))
