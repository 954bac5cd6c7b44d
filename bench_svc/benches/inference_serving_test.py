"""The benchmark's measurements and its results files, at toy sizes (numbers are not checked, only their shape)."""

from __future__ import annotations

import json

from bench_svc.benches.inference_serving import Row, engine_latency, engine_throughput, write_results
from inference_svc.engine import Engine
from inference_svc.runner import TorchRunner


def test_engine_measurements_and_results_files(tiny, tmp_path):
    prompts = [tuple(tiny.tokenizer.encode(p)) for p in ("to be", "or not to", "t", "whether")]
    with Engine(TorchRunner(tiny.model, n_slots=4), tiny.tokenizer) as engine:
        ms, ttft = engine_latency(engine, prompts[0], new_tokens=5, repeats=2)
        load = engine_throughput(engine, prompts, new_tokens=4)
        assert engine.stats().free_slots == 4
    assert ms > 0 and ttft > 0 and load["tokens_per_s"] > 0
    assert load["ttft_p50_ms"] <= load["ttft_p95_ms"] and load["itl_p50_ms"] <= load["itl_p95_ms"]

    rows = [
        Row("torch cpu float32", "engine batch 1", 1, 5, ms, 1e3 / ms),
        Row("torch cpu float32", "engine 4 concurrent", 4, 4, None, **load),
    ]
    header = {
        "device": "cpu: test",
        "git_commit": "abc",
        "command": "python -m bench_svc.benches.inference_serving --device cpu",
    }
    csv_path, json_path, png_path = write_results(tmp_path, "inference-cpu", header, rows)
    lines = csv_path.read_text().splitlines()
    assert lines[:3] == [
        "# device: cpu: test",
        "# git_commit: abc",
        "# command: python -m bench_svc.benches.inference_serving --device cpu",
    ]
    assert lines[3].startswith("backend,scenario,concurrency,new_tokens,ms_per_token,tokens_per_s") and len(lines) == 6
    document = json.loads(json_path.read_text())
    assert document["header"] == header and [r["scenario"] for r in document["rows"]] == [
        "engine batch 1",
        "engine 4 concurrent",
    ]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
