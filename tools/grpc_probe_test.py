"""tools.grpc_probe on a small load: the real server (both constructions) over the instant runner, clients in
separate processes; the figures it reports hang together."""

from __future__ import annotations

import time

import pytest

from inference_svc.engine import DecodeSteps, Engine
from inference_svc.main import SERVERS
from inference_svc.params import Request
from model.sampling import SamplingParams
from model.tokenizers import CharTokenizer
from tools.grpc_probe import PacedRunner, engine_ceiling, probe


@pytest.mark.parametrize(
    "server, decode_steps, asynchronous, engine",
    [(s, 4, False, "thread") for s in SERVERS]
    + [("aio", 1, False, "thread"), ("aio", None, True, "thread"), ("aio", None, True, "process")],
)
def test_probe_streams_every_token_and_reports_consistent_figures(server, decode_steps, asynchronous, engine):
    steps = DecodeSteps() if decode_steps is None else decode_steps  # None: by batch, as on CUDA graphs
    r = probe(4, new_tokens=12, requests=2, processes=2, step_ms=0.2, server=server, messages_per_s=2000.0,
              switch_interval_ms=None, decode_steps=steps, asynchronous=asynchronous, prefill_ms=0.3,
              engine=engine)  # fmt: skip
    assert r["tokens_per_s"] > 0 and r["messages_per_s"] > 0
    # 12 tokens a request: never more messages than tokens, never fewer than one a request
    assert 1.0 <= r["tokens_per_message"] <= 12.0
    assert 0 < r["engine_ttft_p50_ms"] <= r["ttft_p50_ms"]  # the engine's part of what a client waits for
    assert r["server_cpu_s_per_1k_tokens"] > 0
    if engine == "process":  # the engine process's CPU, part of the server's (/proc counts 10 ms ticks: this small a
        # load may take fewer than one in the child)
        assert 0 <= r["engine_process_cpu_s_per_1k_tokens"] < r["server_cpu_s_per_1k_tokens"]
    else:
        assert r["engine_process_cpu_s_per_1k_tokens"] is None


def test_engine_ceiling_counts_the_engines_own_time():
    assert engine_ceiling(8, new_tokens=16, step_ms=0.0) > engine_ceiling(8, new_tokens=16, step_ms=5.0)


def test_the_simulated_device_runs_behind_the_engine_and_its_marks_wait_for_it():
    """--async-device: a launch returns at once and queues its time; a mark waits for what was launched before it
    (not after); the engine over it streams every token and its first token comes with its prefill, not after the
    decode steps launched behind it."""
    runner = PacedRunner(2, 0.05, asynchronous=True, prefill_s=0.01)
    t0 = time.perf_counter()
    runner.prefill_sample([0], [[1]], [None], [0])
    first = runner.record_event()
    runner.decode_sample([0], 2, False, steps=2)  # 0.1 s on the device
    done = runner.record_event()
    assert time.perf_counter() - t0 < 0.05  # nothing waited yet
    first.synchronize()
    assert 0.01 <= time.perf_counter() - t0 < 0.1
    done.synchronize()
    assert time.perf_counter() - t0 >= 0.11
    assert PacedRunner(2, 0.05).record_event() is None  # a sleeping launch: nothing to wait for after it

    # The engine: a request joins while another decodes 4 steps per engine step (0.2 s on the device). Its first
    # token is streamed once its prefill is done, not after the decode steps launched behind it, so its next token
    # comes two engine steps later (~0.4 s; ~0.2 s if the first one waited for those steps).
    tokenizer = CharTokenizer([chr(32 + i) for i in range(65)])
    runner = PacedRunner(2, 0.05, asynchronous=True)
    with Engine(runner, tokenizer, decode_steps=4) as engine:
        running = engine.submit(Request((1, 2), SamplingParams(max_new_tokens=17, temperature=0.0)))
        running.next_chunk()
        joining = engine.submit(Request((3,), SamplingParams(max_new_tokens=9, temperature=0.0))).result()
        assert len(running.result().token_ids) + 1 == 17 and len(joining.token_ids) == 9
    assert joining.timings.token_ms[1] - joining.timings.ttft_ms > 300
