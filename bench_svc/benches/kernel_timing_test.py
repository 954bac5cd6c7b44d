"""The benchmark arithmetic, on made-up timings (throughput, fraction of ceiling, speed-up and memory saving), and the
CUDA-graph timing of decode-time cases."""

import pytest
import torch

from bench_svc.benches import kernel_timing
from bench_svc.benches.kernel_timing import Ceilings, Measurement, summarize
from kernels.bench_common import BenchCase

CEILINGS = Ceilings(copy_gbps=3000.0, matmul_tflops=700.0)


def _case(kernel, impl, ours, **kw):
    return BenchCase(kernel=kernel, shape="s", impl=impl, ours=ours, setup=lambda: lambda: None, **kw)


def test_summarize_speedup_fraction_and_memory():
    cases = [
        _case("norm", "triton", True, bytes_moved=3e9),
        _case("norm", "eager", False, bytes_moved=3e9),
        _case("norm", "compile", False, bytes_moved=3e9),
        _case("attn", "triton", True, flops=7e11, measure_memory=True),
        _case("attn", "sdpa", False, flops=7e11, measure_memory=True),
    ]
    measurements = [
        Measurement(ms=2.0),
        Measurement(ms=5.0),
        Measurement(ms=3.0),
        Measurement(ms=4.0, peak_mem_mb=100.0),
        Measurement(ms=2.0, peak_mem_mb=450.0),
    ]
    rows = summarize(cases, measurements, CEILINGS)
    ours_norm, eager, _, ours_attn, sdpa = rows
    assert ours_norm.gbps == pytest.approx(1500.0)  # 3e9 bytes in 2 ms
    assert ours_norm.frac_of_ceiling == pytest.approx(0.5)
    assert ours_norm.speedup_vs_best_alt == pytest.approx(1.5)  # best alternative: compile, 3 ms
    assert eager.speedup_vs_best_alt is None and eager.tflops is None
    assert ours_attn.tflops == pytest.approx(175.0)
    assert ours_attn.frac_of_ceiling == pytest.approx(0.25)
    assert ours_attn.speedup_vs_best_alt == pytest.approx(0.5)  # slower than SDPA here
    assert ours_attn.mem_saving_vs_alt == pytest.approx(4.5)
    assert sdpa.mem_saving_vs_alt is None


def test_measure_times_graph_cases_in_a_graph(monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_timing, "time_ms", lambda fn: calls.append(("lone", None)) or 2.0)
    monkeypatch.setattr(kernel_timing, "time_graph_ms", lambda fn, n: calls.append(("graph", n)) or 1.0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert kernel_timing.measure(_case("k", "triton", True, graph_calls=8)).ms == 1.0
    assert kernel_timing.measure(_case("k", "triton", True)).ms == 2.0
    assert calls == [("graph", 8), ("lone", None)]


def test_graph_calls_must_be_positive():
    with pytest.raises(ValueError, match="graph_calls must be >= 0"):
        _case("k", "triton", True, graph_calls=-1)
    with pytest.raises(ValueError, match="calls must be >= 1"):
        kernel_timing.time_graph_ms(lambda: None, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_time_graph_ms_replays_the_captured_calls():
    x = torch.zeros(1, device="cuda")
    host_calls = []

    def step():
        host_calls.append(1)
        x.add_(1.0)

    ms = kernel_timing.time_graph_ms(step, calls=5)
    assert ms > 0
    # The host ran the warm-up and the 5 captured calls once; every replay (>= 1 + 1 + MIN_REPS) added 5 on the GPU.
    assert len(host_calls) == kernel_timing.WARMUP_CALLS + 5
    replays = (x.item() - kernel_timing.WARMUP_CALLS) / 5
    assert replays == int(replays) and replays >= 2 + kernel_timing.MIN_REPS
