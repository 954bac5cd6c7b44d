"""The benchmark arithmetic, on made-up timings: throughput, fraction of ceiling, speed-up and memory saving."""

import pytest

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
