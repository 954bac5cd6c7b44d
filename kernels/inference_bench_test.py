"""Tests for the inference benchmark cases: well-formed, each of ours beside a baseline, graph-timed over enough
copies to leave L2 (no GPU needed)."""

from kernels import inference_bench
from kernels.inference_bench import ROTATE_BYTES, bench_cases, matmul_shapes


def test_cases_are_unique_and_each_group_has_ours_and_a_baseline():
    cases = bench_cases()
    keys = [(c.kernel, c.shape, c.impl) for c in cases]
    assert len(keys) == len(set(keys))
    groups: dict[tuple[str, str], list[bool]] = {}
    for c in cases:
        groups.setdefault((c.kernel, c.shape), []).append(c.ours)
    assert {kernel for kernel, _ in groups} == {"decode_attention", "wo_matmul", "decode step"}
    for key, ours in groups.items():
        assert any(ours) and not all(ours), key


def test_every_case_is_timed_in_a_cuda_graph():
    for c in bench_cases():
        assert c.graph_calls >= 1, (c.kernel, c.shape, c.impl)
        if c.kernel != "decode step":
            assert c.graph_calls >= inference_bench.MIN_GRAPH_CALLS
            # Enough calls that every copy is read once per replay: the working set leaves L2 (or hits MAX_COPIES).
            copies = inference_bench.rotation_copies(int(c.bytes_moved))
            assert c.graph_calls % copies == 0
            assert copies * c.bytes_moved >= ROTATE_BYTES or copies == inference_bench.MAX_COPIES


def test_rotating_cycles_through_the_calls():
    seen = []
    call = inference_bench.rotating([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        call()
    assert seen == [0, 1, 2, 0, 1, 2, 0]


def test_matmul_shapes_cover_every_linear_width_of_both_presets():
    got = {(k, n) for _, k, n in matmul_shapes()}
    # large: C 768, kv 4 x 64, SwiGLU hidden 2048; gpt2-124m: C 768 (q, k, v, o), hidden 3072; both: vocab 50304.
    assert got == {(768, 768), (768, 256), (768, 2048), (2048, 768), (768, 3072), (3072, 768), (768, 50304)}
    labels = {c.shape for c in bench_cases() if c.kernel == "wo_matmul"}
    for _, k, n in matmul_shapes():
        for m in inference_bench.MATMUL_M:
            assert any(label.startswith(f"M{m} {k}->{n} ") for label in labels), (m, k, n)


def test_quantized_cases_read_fewer_bytes_than_bf16():
    by_group: dict[str, dict[str, float]] = {}
    for c in bench_cases():
        assert c.bytes_moved > 0
        if c.kernel == "wo_matmul":
            by_group.setdefault(c.shape, {})[c.impl] = c.bytes_moved
    for shape, impls in by_group.items():
        bf16 = impls.pop("torch bf16 matmul")
        int4 = {"triton int4-g32"} | ({"triton int4-g128"} if shape == "M1 768->50304 (lm_head)" else set())
        assert set(impls) == {"triton int8"} | int4, shape
        assert impls["triton int8"] < bf16 / 1.9
        # fp32 scales add 32 / group_size bits per weight: 5 bits at group 32, so > 3x fewer bytes.
        assert all(impls[impl] < bf16 / 3 for impl in int4)
    step = {c.impl.split()[0]: c.bytes_moved for c in bench_cases() if c.kernel == "decode step"}
    assert step["int8"] < step["bf16"] / 1.9 and step["int4-g32"] < step["bf16"] / 3
