"""Tests for the inference benchmark cases: well-formed, each of ours beside a baseline (no GPU needed)."""

from kernels.inference_bench import bench_cases


def test_cases_are_unique_and_each_group_has_ours_and_a_baseline():
    cases = bench_cases()
    keys = [(c.kernel, c.shape, c.impl) for c in cases]
    assert len(keys) == len(set(keys))
    groups: dict[tuple[str, str], list[bool]] = {}
    for c in cases:
        groups.setdefault((c.kernel, c.shape), []).append(c.ours)
    assert {kernel for kernel, _ in groups} == {"decode_attention", "wo_matmul"}
    for key, ours in groups.items():
        assert any(ours) and not all(ours), key


def test_quantized_cases_read_fewer_bytes_than_bf16():
    by_group: dict[str, dict[str, float]] = {}
    for c in bench_cases():
        assert c.bytes_moved > 0
        if c.kernel == "wo_matmul":
            by_group.setdefault(c.shape, {})[c.impl] = c.bytes_moved
    for shape, impls in by_group.items():
        bf16 = impls.pop("torch bf16 matmul")
        assert set(impls) == {"triton int8", "triton int4-g32", "triton int4-g64", "triton int4-g128"}, shape
        assert impls["triton int8"] < bf16 / 1.9
        # fp32 scales add 32 / group_size bits per weight: 5 bits at group 32, so > 3x fewer bytes.
        assert all(impls[f"triton int4-g{g}"] < bf16 / 3 for g in (32, 64, 128))
