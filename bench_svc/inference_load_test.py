"""The inference suite against a real gRPC InferenceService: one row per concurrency level, anchored at 1."""

import dataclasses

import pytest

from bench_svc import inference_load
from bench_svc.results_io import read_result


def test_levels_start_at_concurrency_one():
    for quick in (True, False):
        plan = inference_load.levels(quick)
        assert plan[0].concurrency == 1
        assert [lv.concurrency for lv in plan] == sorted(lv.concurrency for lv in plan)


def test_suite_measures_every_level_against_the_single_client_anchor(tiny_ctx, counting_server):
    address, servicer = counting_server
    result = inference_load.run(dataclasses.replace(tiny_ctx, inference_address=address))
    assert result.ok, result.status
    doc = read_result(next(p for p in result.files if p.suffix == ".json"))
    rows = doc["rows"]
    plan = inference_load.levels(True)
    assert [r["concurrency"] for r in rows] == [lv.concurrency for lv in plan]
    assert [r["requests"] for r in rows] == [lv.requests for lv in plan]
    assert servicer.calls == sum(lv.requests for lv in plan)
    assert all(r["errors"] == 0 and r["tokens"] == r["requests"] * plan[0].max_new_tokens for r in rows)
    assert rows[0]["throughput_vs_c1"] == 1.0
    anchor = doc["header"]["anchor"]
    assert "concurrency 1" in anchor["name"] and anchor["value"] == rows[0]["tokens_per_s"]
    assert {"ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms", "itl_p99_ms"} <= set(rows[0])
    assert any(p.suffix == ".png" for p in result.files)


def test_a_remote_address_is_refused(tiny_ctx):
    with pytest.raises(ValueError, match="loopback"):
        inference_load.run(dataclasses.replace(tiny_ctx, inference_address="198.51.100.7:50051"))


def test_suite_against_a_real_inference_service(tiny_ctx, tiny_artifact):
    """No address: the suite starts the real InferenceService (its own entry point) on the artifact and loads it."""
    result = inference_load.run(dataclasses.replace(tiny_ctx, model_path=tiny_artifact))
    assert result.ok, result.status
    rows = read_result(next(p for p in result.files if p.suffix == ".json"))["rows"]
    plan = inference_load.levels(True)
    assert [r["concurrency"] for r in rows] == [lv.concurrency for lv in plan]
    # random weights never stop early: every request streams max_new_tokens tokens
    assert all(r["errors"] == 0 and r["tokens"] == r["requests"] * plan[0].max_new_tokens for r in rows)
    assert all(r["ttft_p50_ms"] > 0 and r["itl_p50_ms"] > 0 for r in rows)
    assert rows[0]["address"].startswith("127.0.0.1:")
