"""tools.grpc_probe on a small load: the real server (both constructions) over the instant runner, clients in
separate processes; the figures it reports hang together."""

from __future__ import annotations

import pytest

from inference_svc.main import SERVERS
from tools.grpc_probe import engine_ceiling, probe


@pytest.mark.parametrize("server, decode_steps", [(s, 4) for s in SERVERS] + [("aio", 1)])
def test_probe_streams_every_token_and_reports_consistent_figures(server, decode_steps):
    r = probe(4, new_tokens=12, requests=2, processes=2, step_ms=0.2, server=server, messages_per_s=2000.0,
              switch_interval_ms=None, decode_steps=decode_steps)  # fmt: skip
    assert r["tokens_per_s"] > 0 and r["messages_per_s"] > 0
    # 12 tokens a request: never more messages than tokens, never fewer than one a request
    assert 1.0 <= r["tokens_per_message"] <= 12.0
    assert 0 < r["engine_ttft_p50_ms"] <= r["ttft_p50_ms"]  # the engine's part of what a client waits for
    assert r["server_cpu_s_per_1k_tokens"] > 0


def test_engine_ceiling_counts_the_engines_own_time():
    assert engine_ceiling(8, new_tokens=16, step_ms=0.0) > engine_ceiling(8, new_tokens=16, step_ms=5.0)
