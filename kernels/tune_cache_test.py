"""The tuning cache: picks survive a new process, only for the same kernel, key, GPU and candidates; concurrent writers
lose nothing; a broken or switched-off cache only costs a retune. And the fused add + norm's tuners read it first."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
import triton

from kernels import tune_cache

CANDIDATES = [triton.Config({"BLOCK_ROWS": r}, num_warps=w) for r in (4, 8) for w in (2, 4)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.delenv("TINYLM_TUNE_CACHE", raising=False)


def test_a_pick_is_recalled_for_its_kernel_key_and_gpu_only():
    tune_cache.remember("k", (384, "bf16"), "GPU A", CANDIDATES[2])
    assert tune_cache.path().is_file()
    assert tune_cache.recall("k", (384, "bf16"), "GPU A", CANDIDATES) is CANDIDATES[2]
    assert tune_cache.recall("k", (384, "bf16"), "GPU B", CANDIDATES) is None  # another GPU tunes again
    assert tune_cache.recall("k", (512, "bf16"), "GPU A", CANDIDATES) is None
    assert tune_cache.recall("other", (384, "bf16"), "GPU A", CANDIDATES) is None
    # no longer a candidate (the kernel's configs changed): tune again rather than launch a config nobody offers
    assert tune_cache.recall("k", (384, "bf16"), "GPU A", CANDIDATES[:2] + CANDIDATES[3:]) is None


def test_a_broken_or_switched_off_cache_costs_only_a_retune(monkeypatch, caplog):
    file = tune_cache.path()
    file.parent.mkdir(parents=True)
    file.write_text("{not json")
    assert tune_cache.recall("k", (1,), "G", CANDIDATES) is None
    assert "ignoring the unreadable tuning cache" in caplog.text
    tune_cache.remember("k", (1,), "G", CANDIDATES[0])  # rewrites a valid file
    assert tune_cache.recall("k", (1,), "G", CANDIDATES) is CANDIDATES[0]
    monkeypatch.setenv("TINYLM_TUNE_CACHE", "0")
    assert tune_cache.recall("k", (1,), "G", CANDIDATES) is None
    tune_cache.remember("k", (2,), "G", CANDIDATES[1])
    monkeypatch.setenv("TINYLM_TUNE_CACHE", "1")
    assert tune_cache.recall("k", (2,), "G", CANDIDATES) is None  # nothing was written while off


def _writer(cache_dir: str, name: str) -> None:
    import os

    os.environ["TRITON_CACHE_DIR"] = cache_dir
    for i in range(25):
        tune_cache.remember(name, (i,), "G", CANDIDATES[i % len(CANDIDATES)])


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "triton"), f"k{j}")) for j in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    doc = json.loads(tune_cache.path().read_text())
    assert len(doc) == 75
    assert tune_cache.recall("k1", (7,), "G", CANDIDATES) is CANDIDATES[7 % 4]


def test_the_add_norm_backward_tuner_takes_a_remembered_pick_without_timing(monkeypatch):
    from kernels import fused_add_norm as fan

    monkeypatch.setattr(fan, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    block_c = 512
    candidates = fan.configs_for(fan.BWD_CONFIGS, block_c)
    key = (fan._add_norm_bwd, 384, ("IS_RMS", False), torch.bfloat16)
    fan._remember(key, candidates[-1])  # as an earlier process would have
    fan._TUNED.clear()  # a new process: nothing in memory

    def no_timing(*args):
        raise AssertionError("tuned again despite a remembered pick")

    assert fan._backward_config(key, block_c, no_timing, no_timing) is candidates[-1]
    assert fan._TUNED[key] is candidates[-1]
