"""The benchmark's measurements and its results files, at toy sizes (numbers are not checked, only their shape)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench_svc.benches.inference_serving import (
    CPU_PLAN,
    Row,
    _grpc_row,
    engine_latency,
    engine_throughput,
    main,
    write_results,
)
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


def test_multi_step_engines_are_also_measured_at_one_step_per_launch(tiny, monkeypatch):
    """An engine that decodes several steps per launch (the CUDA default) gets in-run anchor rows at one step."""
    from bench_svc.benches import inference_serving as bench

    made = []

    class MultiStep(Engine):  # a CPU runner's engine defaults to 1 step: ask for 3 where the bench takes the default
        def __init__(self, *args, decode_steps=None, **kw):
            super().__init__(*args, decode_steps=3 if decode_steps is None else decode_steps, **kw)
            made.append(self.decode_steps)

    monkeypatch.setattr(bench, "Engine", MultiStep)
    plan = bench.Plan(new_tokens=6, latency_repeats=1, concurrency=9, grpc_streams=(), grpc_requests_per_stream=1,
                      grpc_client_processes=1)  # fmt: skip
    rows = bench._engine_rows("torch cpu float32", TorchRunner(tiny.model, n_slots=9), tiny.tokenizer, plan, False)
    assert made == [3, 1]
    scenarios = [r.scenario for r in rows]
    assert scenarios == [
        "engine batch 1, 1 decode step per launch",
        "engine 9 concurrent, 1 decode step per launch",
        "engine batch 1",
        "engine 9 concurrent",
    ]
    assert all(r.tokens_per_s > 0 for r in rows)


def test_cpu_rows_every_weights_choice_against_hf_generate_with_the_target(tiny, monkeypatch):
    """On CPU: the engine's rows once per `cpu_weights` choice, HF generate's batch-1 rows in float32 and bfloat16
    taken in the same alternation, and each engine batch-1 row's target against the fastest HF row."""
    pytest.importorskip("transformers")  # the bench's own behaviour without it: no HF rows (hf_generate_call -> None)
    from bench_svc.benches import inference_serving as bench

    monkeypatch.setattr(bench, "CPU_ALTERNATING_ROUNDS", 2)
    plan = bench.Plan(new_tokens=4, latency_repeats=1, concurrency=9, grpc_streams=(), grpc_requests_per_stream=1,
                      grpc_client_processes=1)  # fmt: skip
    rows = bench._cpu_engine_rows(tiny.model, tiny.tokenizer, plan, with_hf=True)
    assert [(r.backend, r.scenario) for r in rows] == [
        *[(b, s) for b in ("torch cpu float32", "torch cpu bfloat16", "torch cpu int8 weights")
          for s in ("engine batch 1", "engine 9 concurrent")],
        ("hf generate cpu float32", "hf generate batch 1"),
        ("hf generate cpu bfloat16", "hf generate batch 1"),
    ]  # fmt: skip
    best_name, best_ms = min(((r.backend, r.ms_per_token) for r in rows[-2:]), key=lambda x: x[1])
    for r in rows[:6]:
        assert r.tokens_per_s > 0
        if r.scenario == "engine batch 1":
            share = r.ms_per_token / best_ms
            assert r.target.startswith(f"<= 0.6x {best_name} ({best_ms:.2f} ms; now {share:.2f}x)")
            assert r.meets_target == (share <= 0.6)
        else:
            assert r.target == "" and r.meets_target is None
    assert tiny.model.lm_head.weight.dtype == torch.float32  # each engine ran on its own copy


def test_cpu_rows_with_int8_eager_add_its_engine_in_the_turns(tiny, monkeypatch):
    """--cpu-int8-eager: the int8 engine with cpu_compile=False as one more contender (its own rows, no HF here)."""
    from bench_svc.benches import inference_serving as bench

    monkeypatch.setattr(bench, "CPU_ALTERNATING_ROUNDS", 1)
    plan = bench.Plan(new_tokens=3, latency_repeats=1, concurrency=9, grpc_streams=(), grpc_requests_per_stream=1,
                      grpc_client_processes=1)  # fmt: skip
    rows = bench._cpu_engine_rows(tiny.model, tiny.tokenizer, plan, with_hf=False, int8_eager=True)
    backends = ["torch cpu float32", "torch cpu bfloat16", "torch cpu int8 weights", "torch cpu int8 weights, eager"]
    assert [(r.backend, r.scenario) for r in rows] == [
        (b, s) for b in backends for s in ("engine batch 1", "engine 9 concurrent")
    ]
    assert all(r.tokens_per_s > 0 for r in rows)


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
def test_a_grpc_row_over_a_real_server_with_its_engine_on_a_thread_or_in_a_process(tiny, engine_process):
    """The gRPC row starts `python -m inference_svc serve` (with --engine-process: its engine in a child process),
    streams from real client processes, and labels the row by where the engine ran."""
    plan = dataclasses.replace(CPU_PLAN, new_tokens=6, grpc_requests_per_stream=1, grpc_client_processes=1)
    row = _grpc_row("torch cpu float32", tiny.path, tiny.tokenizer, "cpu", plan, False, 1, 2, engine_process)
    assert row.backend == "torch cpu float32" + (", engine process" if engine_process else "")
    assert row.scenario == "grpc 2 streams" and row.tokens_per_s > 0 and row.ttft_p50_ms > 0


def test_a_bad_grpc_engine_is_named(capsys):
    assert main(["--grpc-engine", "thread,proc", "--skip", "engine,grpc,onnx,hf"]) == 2
    assert "--grpc-engine must be auto or list thread and/or process, got 'thread,proc'" in capsys.readouterr().err
