"""Tests for the weight-only INT8 / INT4 matmuls: Triton (interpreter on CPU) against dequantise-then-matmul."""

from dataclasses import replace

import pytest
import torch
from triton import next_power_of_2 as triton_next_power_of_2

from kernels.quant_format import INT4_GROUP_SIZES, pack_int4, pack_int8, unpack_int4
from kernels.wo_matmul import (
    _tickets,
    BYTE_DOT_ENTRIES,
    CANDIDATES,
    DOT_BYTES_WIDE_GROUP_BUDGET,
    DOT_REGISTER_BUDGET,
    FMA_REGISTER_BUDGET,
    MAX_FMA_PAIRS,
    MAX_SPLIT_K,
    WoConfig,
    candidate_configs,
    dot_tile_elements,
    int4_matmul,
    int4_matmul_reference,
    int4_matmul_triton,
    int8_matmul,
    int8_matmul_reference,
    int8_matmul_triton,
    max_split,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs GPU tensors where there is a GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real shapes in bf16)")

# Both inner products, a partial N tile and (for INT8) a partial K tile; None = the default (autotuned on a GPU).
CONFIGS = [None, WoConfig(block_n=4, block_k=128), WoConfig(block_n=16, block_k=64, use_dot=True)]


def _inputs(m: int, n: int, k: int, seed: int, device: str = DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device)
    return x, w


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "fma", "dot"])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_int8_triton_matches_reference(m, config):
    x, w = _inputs(m, 37, 200, seed=m)  # odd N (partial N tile) and K = 200 (partial K tile)
    q, scale = pack_int8(w)
    got = int8_matmul_triton(x, q, scale, config=config)
    torch.testing.assert_close(got, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "fma", "dot"])
@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_int4_triton_matches_reference(m, group_size, config):
    if config is not None and config.block_k < group_size:
        config = WoConfig(config.block_n, group_size, config.use_dot)
    x, w = _inputs(m, 19, 384, seed=group_size + m)  # odd N; K = 384: a partial K tile at BLOCK_K 128 or 256
    packed, scales = pack_int4(w, group_size)
    got = int4_matmul_triton(x, packed, scales, group_size, config=config)
    torch.testing.assert_close(got, int4_matmul_reference(x, packed, scales, group_size), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("words", [True, False], ids=["words", "bytes"])
@pytest.mark.parametrize("block_n,block_k", [(4, 128), (8, 256), (2, 1024), (64, 256)])
@pytest.mark.parametrize("m", [1, 3])
def test_fma_word_and_byte_paths_match_reference(m, words, block_n, block_k):
    # The FMA path reads 4-byte aligned rows as int32 words (unpacked with shifts) unless told not to; K = 416 / 384
    # leaves a partial step at every BLOCK_K here, N = 21 a partial N tile, M = 3 a partial M tile.
    config = WoConfig(block_n=block_n, block_k=block_k)
    x, w = _inputs(m, 21, 416, seed=block_k + m)
    q, scale = pack_int8(w)
    got8 = int8_matmul_triton(x, q, scale, config=config, words=words)
    torch.testing.assert_close(got8, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)
    for group_size in INT4_GROUP_SIZES:
        packed, scales = pack_int4(w[:, :384], group_size)
        c4 = WoConfig(block_n, max(block_k, group_size))
        got4 = int4_matmul_triton(x[:, :384], packed, scales, group_size, config=c4, words=words)
        want4 = int4_matmul_reference(x[:, :384], packed, scales, group_size)
        torch.testing.assert_close(got4, want4, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_n,block_k", [(16, 128), (32, 256)])
@pytest.mark.parametrize("m", [2, 5, 16])
def test_word_dot_path_matches_reference(m, block_n, block_k):
    # The dot path on words: each tile dequantised once into k order (nested tl.join + reshape), then one tl.dot with
    # the weights on the left. K = 384 / 416: a partial step at BLOCK_K 256; N = 37: a partial N tile.
    config = WoConfig(block_n=block_n, block_k=block_k, use_dot=True)
    x, w = _inputs(m, 37, 416, seed=block_k + m)
    q, scale = pack_int8(w)
    got8 = int8_matmul_triton(x, q, scale, config=config)
    torch.testing.assert_close(got8, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)
    for group_size in INT4_GROUP_SIZES:
        packed, scales = pack_int4(w[:, :384], group_size)
        c4 = WoConfig(block_n, max(block_k, group_size), use_dot=True)
        got4 = int4_matmul_triton(x[:, :384], packed, scales, group_size, config=c4)
        want4 = int4_matmul_reference(x[:, :384], packed, scales, group_size)
        torch.testing.assert_close(got4, want4, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [2, 16])
def test_byte_load_dot_configs_read_bytes_on_word_aligned_rows(m):
    # A byte-load dot config (BYTE_DOT_ENTRIES) takes the byte path on rows the word path could read: it matches the
    # reference and, bit for bit, the byte path forced by words=False with the same tiles (the word path's dot sums
    # in another order). K = 384: a partial step at BLOCK_K 256; N = 37: a partial N tile.
    x, w = _inputs(m, 37, 384, seed=40 + m)
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 32)
    for block_n, block_k, warps, stages in BYTE_DOT_ENTRIES[1:3]:  # BLOCK_K 256 and 128 (the interpreter is slow)
        config = WoConfig(block_n, block_k, True, warps, stages, byte_loads=True)
        same_tiles = WoConfig(block_n, block_k, True, warps, stages)
        got8 = int8_matmul_triton(x, q, scale, config=config)
        torch.testing.assert_close(got8, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)
        assert torch.equal(got8, int8_matmul_triton(x, q, scale, config=same_tiles, words=False))
        got4 = int4_matmul_triton(x, packed, scales, 32, config=config)
        torch.testing.assert_close(got4, int4_matmul_reference(x, packed, scales, 32), atol=1e-4, rtol=1e-4)
        assert torch.equal(got4, int4_matmul_triton(x, packed, scales, 32, config=same_tiles, words=False))


def test_byte_load_dot_candidates_only_beside_the_word_path():
    # 8c88389's dot set (the byte path's tl.dot: 0.0178 ms at the M=16 INT4-g32 lm_head on the H200, where the word
    # path's dot takes 0.0577) is timed beside the word path's configs at M 2..16 (a 16-row tl.dot tile; at 64 rows
    # they spilled); on the byte path the plain dot configs already read bytes.
    lm_head = candidate_configs(16, 768, 32, True, max_split(16, 50304))
    got = {(c.block_n, c.block_k, c.num_warps, c.num_stages) for c in lm_head if c.byte_loads}
    assert got == set(BYTE_DOT_ENTRIES)
    assert all(c.use_dot and c.split_k == 1 for c in CANDIDATES if c.byte_loads)
    for group_size in (1, *INT4_GROUP_SIZES):
        assert not any(c.byte_loads for c in candidate_configs(1, 768, group_size, True))
        for m_bucket in (2, 16, 64):
            word_path = candidate_configs(m_bucket, 768, group_size, True, MAX_SPLIT_K)
            assert any(c.byte_loads for c in word_path) == (m_bucket <= 16)
            assert not any(c.byte_loads for c in candidate_configs(m_bucket, 768, group_size, False, MAX_SPLIT_K))


def test_wide_group_byte_loads_keep_the_tighter_dot_budget():
    # INT4 groups of 128 read as bytes spilled on sm_90 (triton 3.6) at 84-100 tile values a thread: those configs
    # leave the byte-loaded candidates; the word loads and groups of 32 keep the wider budget.
    def per_thread(c, m_bucket):
        return dot_tile_elements(m_bucket, c) / (32 * c.num_warps)

    for m_bucket in (2, 16):
        wide_bytes = candidate_configs(m_bucket, 2560, 128, False, MAX_SPLIT_K)
        wide_bytes += [c for c in candidate_configs(m_bucket, 2560, 128, True, MAX_SPLIT_K) if c.byte_loads]
        assert wide_bytes and all(per_thread(c, m_bucket) <= DOT_BYTES_WIDE_GROUP_BUDGET for c in wide_bytes)
        assert WoConfig(64, 128, True, 4, 3) not in candidate_configs(m_bucket, 2560, 128, False, MAX_SPLIT_K)
        assert WoConfig(64, 128, True, 4, 3) in candidate_configs(m_bucket, 2560, 128, True, MAX_SPLIT_K)
        assert WoConfig(64, 128, True, 4, 3) in candidate_configs(m_bucket, 2560, 32, False, MAX_SPLIT_K)


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "fma"])
@pytest.mark.parametrize("m", [2, 16])
def test_group_scale_word_path_matches_reference(m, use_dot):
    # INT4 on words with each group's scale loaded once and repeated to its words (group_scales): every group size,
    # one group per step up to several (BLOCK_K 128 at G 32: 4 groups of 4 words), a partial K step (K = 384 at
    # BLOCK_K 256 and G 128: the last step's group is masked), a split K; N = 37: a partial N tile.
    x, w = _inputs(m, 37, 384, seed=60 + m)
    for group_size in INT4_GROUP_SIZES:
        packed, scales = pack_int4(w, group_size)
        want = int4_matmul_reference(x, packed, scales, group_size)
        for block_k, split_k in ((max(128, group_size), 1), (256, 1), (128, 2 if use_dot else 1)):
            if block_k < group_size:
                continue
            config = WoConfig(16, block_k, use_dot, split_k=split_k, group_scales=True)
            got = int4_matmul_triton(x, packed, scales, group_size, config=config)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda e: f"{config} G{group_size}: {e}")


def test_group_scale_candidates_mirror_the_int4_word_dot_configs():
    # Each word-path INT4 dot config is offered again with group_scales (INT8 has no group scales; the byte path
    # already loads one scale per group).
    for group_size in INT4_GROUP_SIZES:
        for m_bucket in (2, 16, 64):
            got = candidate_configs(m_bucket, 768, group_size, True, MAX_SPLIT_K)
            plain = {
                replace(c, group_scales=True) for c in got if c.use_dot and not c.byte_loads and not c.group_scales
            }
            assert plain and plain == {c for c in got if c.group_scales}
            assert not any(c.group_scales for c in candidate_configs(m_bucket, 768, group_size, False, MAX_SPLIT_K))
    assert not any(c.group_scales for c in candidate_configs(16, 768, 1, True, MAX_SPLIT_K))
    assert all(c.use_dot and not c.byte_loads for c in CANDIDATES if c.group_scales)


def _every_code_weight(n: int, k: int, bits: int) -> torch.Tensor:
    """A weight whose quantised codes take every value (-127..127 / -8..7 are not all reachable by rounding, so the
    codes are built first) at every position of a word: row r, column c holds code (r + c) mod the code count."""
    codes = torch.arange(n)[:, None] + torch.arange(k)[None, :]
    if bits == 8:
        return ((codes % 255) - 127).float()  # pack_int8 maps the row max |w| = 127 onto 127: q == w
    return ((codes % 15) - 7).float()  # -7..7: with scale max / 7 = 1, q == w (u = 1..15)


@pytest.mark.parametrize("use_dot", [False, True], ids=["fma", "dot"])
def test_every_code_at_every_position_decodes(use_dot):
    # The magic-number decode (a field moved under the mantissa of 1.0) for every INT8 code -127..127 and INT4 code
    # -7..7, at every byte / nibble of a word, on both word paths: integer weights and x, so the sums are exact.
    m = 2
    x = torch.randint(-3, 4, (m, 512), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    w8 = _every_code_weight(20, 512, 8).to(DEVICE)
    q, scale = pack_int8(w8)
    assert torch.equal(q.float(), w8) and torch.all(scale == 1)
    config = WoConfig(block_n=16, block_k=256, use_dot=use_dot)
    torch.testing.assert_close(int8_matmul_triton(x, q, scale, config=config), x @ w8.T, atol=0, rtol=0)
    w4 = _every_code_weight(20, 512, 4).to(DEVICE)
    packed, scales = pack_int4(w4, 128)
    assert torch.all(scales == 1)
    config = WoConfig(block_n=16, block_k=128, use_dot=use_dot)
    torch.testing.assert_close(int4_matmul_triton(x, packed, scales, 128, config=config), x @ w4.T, atol=0, rtol=0)


@pytest.mark.parametrize("words", [True, False], ids=["words", "bytes"])
@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
@pytest.mark.parametrize("m", [3, 16, 20])
def test_split_k_matches_reference_and_resets_its_tickets(m, split_k, words):
    # K = 640 in BLOCK_K 128 steps: 5 steps over 1 / 2 / 3 / 8 slices (uneven slices; at 8, three slices are empty);
    # M = 20 gives two M tiles, N = 40 three N tiles. Twice in a row: the second call finds the tickets at 0 again.
    config = WoConfig(block_n=16, block_k=128, use_dot=True, split_k=split_k)
    x, w = _inputs(m, 40, 640, seed=split_k + m)
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 64)
    for _ in range(2):
        got8 = int8_matmul_triton(x, q, scale, config=config, words=words)
        torch.testing.assert_close(got8, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)
        got4 = int4_matmul_triton(x, packed, scales, 64, config=config, words=words)
        torch.testing.assert_close(got4, int4_matmul_reference(x, packed, scales, 64), atol=1e-4, rtol=1e-4)
        assert not _tickets(x.device).any()


def test_split_k_needs_the_dot_path():
    x, w = _inputs(2, 16, 256, seed=1)
    q, scale = pack_int8(w)
    with pytest.raises(ValueError, match="split_k > 1 needs use_dot=True"):
        int8_matmul_triton(x, q, scale, config=WoConfig(block_n=4, block_k=128, split_k=2))


def test_unaligned_rows_take_the_byte_path():
    x, w = _inputs(1, 12, 202, seed=13)  # K = 202: INT8 rows are not whole words
    q, scale = pack_int8(w)
    torch.testing.assert_close(int8_matmul_triton(x, q, scale), int8_matmul_reference(x, q, scale))
    # A view whose rows start at byte 2: same values as the contiguous weight, read byte by byte.
    q_wide = torch.zeros(12, 204, dtype=torch.int8, device=q.device)
    q_wide[:, 2:] = q
    x200, q200 = x[:, :200], q[:, :200].contiguous()
    q_view = q_wide[:, 2:202]
    assert q_view.data_ptr() % 4 != 0
    torch.testing.assert_close(int8_matmul_triton(x200, q_view, scale), int8_matmul_reference(x200, q200, scale))


def test_int4_logits_within_quantization_error_bound():
    # |x @ w.T - x @ dequant(w).T| <= |x| @ (scale / 2).T: each weight is off by at most half a step.
    group_size = 32
    x, w = _inputs(4, 32, 128, seed=7)
    packed, scales = pack_int4(w, group_size)
    err = (int4_matmul_triton(x, packed, scales, group_size) - x @ w.T).abs()  # (M, N)
    bound = x.abs() @ (scales.repeat_interleave(group_size, dim=1) / 2).T
    assert torch.all(err <= bound + 1e-5)
    ref_err = (int4_matmul_reference(x, packed, scales, group_size) - x @ w.T).abs()
    torch.testing.assert_close(err, ref_err, atol=1e-4, rtol=0)


def test_half_input_gives_half_output_close_to_reference():
    # fp16 stands in for bf16 on CPU (the interpreter's bf16 tl.dot is wrong; the GPU tests below run bf16).
    x, w = _inputs(3, 32, 256, seed=11, dtype=torch.float16)
    packed, scales = pack_int4(w, 64)
    q, scale = pack_int8(w)
    for config in CONFIGS[1:]:
        got4 = int4_matmul_triton(x, packed, scales, 64, config=config)
        got8 = int8_matmul_triton(x, q, scale, config=config)
        assert got4.dtype == got8.dtype == torch.float16
        ref4 = x.float() @ unpack_int4(packed, scales, 64).T
        torch.testing.assert_close(got4.float(), ref4, atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(got8.float(), int8_matmul_reference(x.float(), q, scale), atol=5e-3, rtol=5e-3)


def test_strided_x_is_read_in_place():
    x, w = _inputs(4, 24, 256, seed=4)
    x_strided = torch.stack([x, -x], dim=2).reshape(4, 512)[:, ::2]  # x again, stride (512, 2)
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 32)
    torch.testing.assert_close(int8_matmul_triton(x_strided, q, scale), int8_matmul_reference(x, q, scale))
    torch.testing.assert_close(
        int4_matmul_triton(x_strided, packed, scales, 32), int4_matmul_reference(x, packed, scales, 32)
    )


@pytest.mark.parametrize("words", [False, True])
def test_candidates_fit_each_bucket(words):
    for m_bucket in (1, 2, 4, 8, 16, 32, 64):
        for group_size in (1, *INT4_GROUP_SIZES):
            got = candidate_configs(m_bucket, 768, group_size, words)
            assert got and all(c.block_k >= group_size for c in got)
            per_word = (4 if group_size == 1 else 8) if words else 1
            for c in got:
                if c.use_dot:
                    assert m_bucket >= 2 and c.block_m(m_bucket) >= 16
                else:
                    assert m_bucket <= 16 and c.block_m(m_bucket) == m_bucket
                    assert m_bucket * c.block_n * c.block_k / per_word <= FMA_REGISTER_BUDGET * 32 * c.num_warps
    # Word loads keep a 4-8x smaller accumulator, so more FMA tiles fit at M 8 (at M 16 the x tile and the
    # (BM, BN) products bind first).
    fma = lambda w: {c for c in candidate_configs(8, 768, 1, w) if not c.use_dot}  # noqa: E731
    assert fma(False) < fma(True)
    for c in candidate_configs(16, 768, 32, True):  # every tile within the budgets the sm_90 builds set
        threads = 32 * c.num_warps
        if c.use_dot:
            assert dot_tile_elements(16, c) <= DOT_REGISTER_BUDGET * threads
        else:
            assert 16 * c.block_n <= MAX_FMA_PAIRS and 16 * c.block_k <= 32 * threads
    # 8- and 16-row word-FMA tiles are timed at M 16 too (33b937a)
    assert any(not c.use_dot and c.block_n >= 8 for c in candidate_configs(16, 768, 32, True))
    assert not any(c.use_dot for c in candidate_configs(1, 768, 32))  # M = 1 never pads to 16 rows
    assert all(c.use_dot for c in candidate_configs(64, 768, 32))
    assert len(set(CANDIDATES)) == len(CANDIDATES)


def test_split_candidates_only_where_allowed():
    assert max_split(1, 768) == 1 and max_split(16, 50304) == 1 and max_split(16, 768) == MAX_SPLIT_K
    assert all(c.split_k == 1 for c in candidate_configs(16, 3072, 32, True, split=1))
    split = [c for c in candidate_configs(16, 3072, 32, True, split=MAX_SPLIT_K) if c.split_k > 1]
    assert split and all(c.use_dot for c in split)
    # Each slice holds at least one BLOCK_K step.
    for k in (256, 768, 3072):
        for c in candidate_configs(16, k, 32, True, split=MAX_SPLIT_K):
            assert c.split_k == 1 or -(-k // c.split_k) >= c.block_k


def test_wrappers_accept_leading_dims_and_fall_back_on_cpu():
    x, w = _inputs(6, 16, 64, seed=3, device="cpu")
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 32)
    x3 = x.reshape(2, 3, 64)  # (B, T, K)
    y8 = int8_matmul(x3, q, scale)
    y4 = int4_matmul(x3, packed, scales, 32)
    assert y8.shape == (2, 3, 16) and y4.shape == (2, 3, 16)
    torch.testing.assert_close(y8.reshape(6, 16), int8_matmul_reference(x, q, scale))
    torch.testing.assert_close(y4.reshape(6, 16), int4_matmul_reference(x, packed, scales, 32))


def test_wrappers_forced_to_triton():  # on CPU through the interpreter
    x, w = _inputs(4, 24, 256, seed=8)
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 64)
    x3 = x.reshape(2, 2, 256)
    got8 = int8_matmul(x3, q, scale, impl="triton").reshape(4, 24)
    got4 = int4_matmul(x3, packed, scales, 64, impl="triton").reshape(4, 24)
    torch.testing.assert_close(got8, int8_matmul_reference(x, q, scale), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got4, int4_matmul_reference(x, packed, scales, 64), atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_value_errors():
    x, w = _inputs(2, 16, 64, seed=5)
    packed, scales = pack_int4(w, 32)
    q, scale = pack_int8(w)
    with pytest.raises(ValueError, match="group_size must be one of"):
        int4_matmul(x, packed, scales, 48)
    with pytest.raises(ValueError, match=r"x must have shape \(M, K\) with K=64"):
        int4_matmul_triton(x[:, :32], packed, scales, 32)
    with pytest.raises(ValueError, match="config.block_k must be >= group_size=64"):
        int4_matmul_triton(x, *pack_int4(w, 64), 64, config=WoConfig(block_n=4, block_k=32))
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(N,\)"):
        int8_matmul_triton(x, q, scale.double())
    with pytest.raises(ValueError, match="q must be a 2-D int8 tensor"):
        int8_matmul_triton(x, packed, scale)


@needs_gpu
@pytest.mark.parametrize("m", [1, 5, 16, 64])
@pytest.mark.parametrize("k,n", [(2048, 256), (768, 50304)])  # narrow N, long K; the lm_head
def test_gpu_real_shapes_bf16_autotuned(m, k, n):
    x, w = _inputs(m, n, k, seed=m + n, device="cuda", dtype=torch.bfloat16)
    q, scale = pack_int8(w)
    ref8 = x.float() @ (q.float() * scale[:, None]).T
    torch.testing.assert_close(int8_matmul(x, q, scale).float(), ref8, atol=3e-2, rtol=3e-2)
    for group_size in (32, 128):
        packed, scales = pack_int4(w, group_size)
        ref4 = x.float() @ unpack_int4(packed, scales, group_size).T
        torch.testing.assert_close(int4_matmul(x, packed, scales, group_size).float(), ref4, atol=3e-2, rtol=3e-2)


@needs_gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_every_candidate_config_is_correct(m):
    # The autotuner keeps whichever config is fastest, so each one it may pick must be right (compiled, bf16).
    x, w = _inputs(m, 300, 768, seed=m, device="cuda", dtype=torch.bfloat16)  # N = 300: partial N tiles
    q, scale = pack_int8(w)
    packed, scales = pack_int4(w, 32)
    ref8 = x.float() @ (q.float() * scale[:, None]).T
    ref4 = x.float() @ unpack_int4(packed, scales, 32).T
    for words in (True, False):  # the word and the byte paths (each with its own FMA and dot code and candidates)
        for config in candidate_configs(triton_next_power_of_2(m), 768, 32, words, max_split(m, 300)):
            got8 = int8_matmul_triton(x, q, scale, config=config, words=words).float()
            got4 = int4_matmul_triton(x, packed, scales, 32, config=config, words=words).float()
            torch.testing.assert_close(got8, ref8, atol=3e-2, rtol=3e-2, msg=lambda e: f"{config} {words}: {e}")
            torch.testing.assert_close(got4, ref4, atol=3e-2, rtol=3e-2, msg=lambda e: f"{config} {words}: {e}")


@needs_gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_cuda_graph_replay_follows_new_inputs(fmt):
    # Captured once (after the autotuning call), replayed on new x written in place: the kernel holds no host state.
    x, w = _inputs(1, 3072, 768, seed=21, device="cuda", dtype=torch.bfloat16)
    if fmt == "int8":
        q, scale = pack_int8(w)
        call, ref = (lambda: int8_matmul(x, q, scale)), (lambda: int8_matmul_reference(x.float(), q, scale))
    else:
        packed, scales = pack_int4(w, 32)
        call = lambda: int4_matmul(x, packed, scales, 32)  # noqa: E731
        ref = lambda: int4_matmul_reference(x.float(), packed, scales, 32)  # noqa: E731
    call()  # autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for seed in (1, 2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.testing.assert_close(out.float(), ref().float(), atol=3e-2, rtol=3e-2)


@needs_gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_split_k_graph_replays_stay_correct(fmt):
    # A split launch leaves its tickets at 0 for the next one: replayed several times, every replay is right.
    x, w = _inputs(16, 768, 3072, seed=5, device="cuda", dtype=torch.bfloat16)
    config = WoConfig(block_n=16, block_k=256, use_dot=True, split_k=4)
    if fmt == "int8":
        q, scale = pack_int8(w)
        call, ref = (
            (lambda: int8_matmul_triton(x, q, scale, config=config)),
            (lambda: int8_matmul_reference(x.float(), q, scale)),
        )
    else:
        packed, scales = pack_int4(w, 32)
        call = lambda: int4_matmul_triton(x, packed, scales, 32, config=config)  # noqa: E731
        ref = lambda: int4_matmul_reference(x.float(), packed, scales, 32)  # noqa: E731
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for seed in (1, 2, 3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.testing.assert_close(out.float(), ref().float(), atol=3e-2, rtol=3e-2)
    assert not _tickets(x.device).any()
