"""The memory suite: CPU peak-memory measurement sees torch's allocations, and training needs more than inference."""

import torch

from bench_svc import memory
from bench_svc.results_io import read_result

MIB = 2**20


def test_peak_bytes_counts_a_known_allocation_and_ignores_earlier_ones():
    held = torch.ones(4 * MIB // 4)  # allocated before: not part of the peak

    def step():
        a = torch.ones(2 * MIB // 4)  # 2 MiB of float32
        b = torch.ones(MIB // 4)  # 1 MiB more while `a` is alive
        del a, b

    peak = memory.peak_bytes(step, torch.device("cpu"))
    assert 3 * MIB <= peak < 3.5 * MIB
    assert held.numel() == MIB


def test_training_needs_more_memory_than_inference_and_both_grow_with_length(tiny_ctx):
    result = memory.run(tiny_ctx)
    assert result.ok, result.status
    doc = read_result(next(p for p in result.files if p.suffix == ".json"))
    rows = doc["rows"]
    assert [r["seq_len"] for r in rows] == [16, 32, 64, 128]
    assert all(r["train_peak_mib"] > r["forward_peak_mib"] > 0 for r in rows)
    assert rows[-1]["forward_peak_mib"] > rows[0]["forward_peak_mib"]
    assert rows[-1]["train_peak_mib"] > rows[0]["train_peak_mib"]
    # forward + backward holds the gradients too: at least the parameters' size.
    assert all(r["train_peak_mib"] >= r["params_mib"] for r in rows)
    assert doc["header"]["anchor"]["name"].startswith("forward only")
    assert any(p.suffix == ".png" for p in result.files)
