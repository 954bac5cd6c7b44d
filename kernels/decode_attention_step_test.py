"""The decode attention step (QK-norm, RoPE, cache write, single-pass attention; Triton, the interpreter on CPU)
against its PyTorch reference: the output and both cache buffers, MHA / GQA / MQA, rows at position 0 and at the last
position, stale garbage past each row's position, bf16; the GPU test (real shapes, graph capture) skips on CPU."""

import pytest
import torch

from kernels.decode_attention import decode_attention_reference
import kernels.decode_attention_step as step_module
from kernels.decode_attention_step import (
    decode_attention_step,
    decode_attention_step_reference,
    decode_attention_step_triton,
    key_splits,
)
from kernels.dispatch import split_tickets

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (real shapes in bf16, graph capture)")
FP32 = dict(atol=1e-4, rtol=1e-4)  # RoPE tables from exp2 here, from pow in the reference: ~1e-5 apart
N_LAYER, LAYER = 3, 1  # the kernel writes and reads one layer of the model's (slot, layer, ...) buffers


def _case(m, n_head, n_kv, d, max_len, seed, dtype=torch.float32, device=DEVICE):
    """qkv (M, (H + 2 Hkv) D); random caches of n_slots = M + 2; distinct slots; positions with both ends present."""
    g = torch.Generator().manual_seed(seed)
    shape = (m + 2, N_LAYER, n_kv, max_len, d)
    k = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    qkv = torch.randn(m, (n_head + 2 * n_kv) * d, generator=g).to(device=device, dtype=dtype)
    slots = torch.randperm(m + 2, generator=g)[:m].to(device)
    positions = torch.randint(0, max_len, (m,), generator=g)
    positions[0], positions[-1] = 0, max_len - 1
    return qkv, k, v, slots, positions.to(device)


def _both(qkv, k, v, slots, positions, n_head, **kw):
    """(triton output, its caches), (reference output, its caches), from the same starting caches."""
    k2, v2 = k.clone(), v.clone()
    got = decode_attention_step_triton(qkv, k, v, LAYER, slots, positions, n_head, **kw)
    want = decode_attention_step_reference(qkv, k2, v2, LAYER, slots, positions, n_head, **kw)
    return (got, k, v), (want, k2, v2)


@pytest.mark.parametrize(
    "m,n_head,n_kv,d",
    [(3, 4, 2, 16), (2, 4, 1, 32), (4, 3, 3, 24), (1, 8, 2, 16)],
    ids=["gqa", "mqa", "mha-d24", "gqa-4"],
)
@pytest.mark.parametrize(
    "rope_theta,qk_eps", [(None, None), (10000.0, None), (500.0, 1e-6)], ids=["plain", "rope", "rope+qknorm"]
)
def test_triton_matches_reference_fp32(m, n_head, n_kv, d, rope_theta, qk_eps):
    if rope_theta is not None and d % 2:
        pytest.skip("RoPE needs an even head_dim")
    case = _case(m, n_head, n_kv, d, max_len=150, seed=m * 10 + n_head + d)
    (got, k, v), (want, k_ref, v_ref) = _both(*case, n_head, rope_theta=rope_theta, qk_norm_eps=qk_eps)
    assert got.shape == (m, n_head * d)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(k, k_ref, **FP32)
    torch.testing.assert_close(v, v_ref, **FP32)


def test_key_splits_cut_few_programs_long_walks():
    assert key_splits(6, 256, 64, 132) == (4, 64)  # shakespeare-char B=1: 6 (row, head) programs, 4 blocks each
    assert key_splits(96, 256, 64, 132) == (2, 128)  # B=16: two programs per unit fill the 132 SMs
    assert key_splits(6 * 64, 256, 64, 132) == (1, 256)  # enough programs: one pass each, no merge
    assert key_splits(1, 8192, 64, 132) == (16, 512)  # capped at MAX_SPLITS, whole blocks per split
    assert key_splits(2, 64, 64, 132) == (1, 64)  # one block: nothing to split
    for units, max_len, block in ((1, 150, 16), (3, 1000, 32), (5, 100, 64)):
        splits, keys = key_splits(units, max_len, block, 132)
        assert keys % block == 0 and (splits - 1) * keys < max_len <= splits * keys  # every key in one split, none idle


@pytest.mark.parametrize("sms", [8, 64])  # few splits, and up to one per 16-key block (most past a row's position)
@pytest.mark.parametrize("rope_theta,qk_eps", [(None, None), (500.0, 1e-6)], ids=["plain", "rope+qknorm"])
def test_split_keys_merge_to_the_single_pass(sms, rope_theta, qk_eps, monkeypatch):
    case = _case(3, 8, 2, 16, max_len=150, seed=sms)  # rows at positions 0, 37 (inside a split), 149
    case[4][1] = 37
    monkeypatch.setattr(step_module, "num_sms", lambda device: 1)  # 6 units >= 1 SM: one pass, no split
    (single, _, _), _ = _both(*[t.clone() for t in case], 8, rope_theta=rope_theta, qk_norm_eps=qk_eps)
    monkeypatch.setattr(step_module, "num_sms", lambda device: sms)
    assert key_splits(6, 150, 16, sms)[0] == (2 if sms == 8 else 10)
    (got, k, v), (want, k_ref, v_ref) = _both(*case, 8, rope_theta=rope_theta, qk_norm_eps=qk_eps)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(got, single, **FP32)
    torch.testing.assert_close(k, k_ref, **FP32)
    torch.testing.assert_close(v, v_ref, **FP32)
    assert not split_tickets(got.device, "test").any()  # the merging program reset every ticket it took


def test_plain_step_is_attention_over_the_written_cache():
    # Without RoPE or QK-norm the step is: write k/v at pos, then decode attention over keys 0..pos.
    qkv, k, v, slots, positions = _case(3, 4, 2, 16, max_len=70, seed=1)
    before_k = k.clone()
    got = decode_attention_step_triton(qkv, k, v, LAYER, slots, positions, 4)
    q, k_new, v_new = qkv.view(3, 8, 16).split([4, 2, 2], dim=1)
    torch.testing.assert_close(k[slots, LAYER, :, positions], k_new, atol=0, rtol=0)
    torch.testing.assert_close(v[slots, LAYER, :, positions], v_new, atol=0, rtol=0)
    written = torch.zeros_like(k, dtype=torch.bool)
    written[slots, LAYER, :, positions] = True
    torch.testing.assert_close(k[~written], before_k[~written], atol=0, rtol=0)  # nothing else touched
    want = decode_attention_reference(q, k[:, LAYER], v[:, LAYER], slots, positions + 1).reshape(3, 64)
    torch.testing.assert_close(got, want, **FP32)


def test_keys_past_the_position_do_not_matter():
    qkv, k, v, slots, positions = _case(2, 2, 2, 16, max_len=100, seed=2)
    positions = torch.tensor([40, 0], device=positions.device)
    before = decode_attention_step_triton(qkv, k.clone(), v.clone(), LAYER, slots, positions, 2)
    past = torch.arange(100, device=k.device) > positions[:, None]  # (M, L): after each row's new token
    for junk in (1e4, float("nan")):
        k2, v2 = k.clone(), v.clone()
        k2[slots, LAYER] = torch.where(past[:, None, :, None], junk, k2[slots, LAYER])
        v2[slots, LAYER] = torch.where(past[:, None, :, None], junk, v2[slots, LAYER])
        torch.testing.assert_close(decode_attention_step_triton(qkv, k2, v2, LAYER, slots, positions, 2), before)


def test_bf16(assert_close):
    qkv, k, v, slots, positions = _case(3, 4, 2, 32, max_len=64, seed=3, dtype=torch.bfloat16)
    (got, k_got, _), (want, k_want, _) = _both(qkv, k, v, slots, positions, 4, rope_theta=10000.0)
    assert got.dtype == torch.bfloat16
    assert_close(got, want)
    assert_close(k_got, k_want)


def test_bad_inputs_are_named():
    qkv, k, v, slots, positions = _case(2, 4, 2, 16, max_len=32, seed=4)
    with pytest.raises(ValueError, match="layer must be in"):
        decode_attention_step(qkv, k, v, N_LAYER, slots, positions, 4)
    with pytest.raises(ValueError, match="qkv must be"):
        decode_attention_step(qkv[:, :-16], k, v, LAYER, slots, positions, 4)
    with pytest.raises(ValueError, match="positions must be an integer tensor"):
        decode_attention_step(qkv, k, v, LAYER, slots, positions.float(), 4)
    with pytest.raises(ValueError, match="multiple of the cache's n_kv_head"):
        decode_attention_step(qkv, k, v, LAYER, slots, positions, 3)


@needs_gpu
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_shakespeare_shape_bf16_in_a_graph(m, assert_close):
    # shakespeare-char: 6 heads of 64, cache max_len 256, 6 layers; captured in a CUDA graph, replayed.
    qkv, k, v, slots, positions = _case(m, 6, 6, 64, max_len=256, seed=m, dtype=torch.bfloat16)
    k_ref, v_ref = k.clone(), v.clone()
    want = decode_attention_step_reference(qkv, k_ref, v_ref, LAYER, slots, positions, 6)
    graph = torch.cuda.CUDAGraph()
    decode_attention_step(qkv, k, v, LAYER, slots, positions, 6)  # compile outside the capture
    with torch.cuda.graph(graph):
        got = decode_attention_step(qkv, k, v, LAYER, slots, positions, 6)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(got, want)
    torch.testing.assert_close(k, k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0)


def test_an_expanded_position_view_is_read_row_by_row():
    """positions as a stride-0 view (one position expanded over the rows, as a reshape of an expanded 1-row tensor
    gives) of a buffer whose next entries differ: every row is at that position (the kernel read [m] past it)."""
    qkv, k, v, slots, _ = _case(3, 4, 2, 16, max_len=40, seed=3)
    buf = torch.tensor([9, 0, 30], device=DEVICE)
    positions = buf[:1][:, None].expand(1, 3).reshape(-1)
    assert positions.stride() == (0,)
    (got, k, v), (want, k_ref, v_ref) = _both(qkv, k, v, slots, positions, 4, rope_theta=10000.0)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(k, k_ref, **FP32)


# Without write_first the outcome is a race: the interpreter's program order loses it every time, a GPU by timing.
@pytest.mark.parametrize("write_first", [True] if GPU else [True, False])
def test_rows_sharing_a_slot_see_each_other_with_write_first(write_first):
    """A speculative verify's rows: 4 rows of one slot at positions p .. p + 3 (listed last position first, so that
    under the interpreter, which runs the programs in order, a row would read its predecessors' keys before they
    are written) plus a row of another slot. With write_first every row attends to the round's earlier rows as the
    reference does (which writes all keys first); without it the later positions miss them."""
    g = torch.Generator().manual_seed(11)
    n_head, n_kv, d, max_len = 4, 2, 16, 48
    shape = (4, N_LAYER, n_kv, max_len, d)
    k = torch.randn(shape, generator=g).to(DEVICE)
    v = torch.randn(shape, generator=g).to(DEVICE)
    qkv = torch.randn(5, (n_head + 2 * n_kv) * d, generator=g).to(DEVICE)
    slots = torch.tensor([2, 2, 2, 2, 0], device=DEVICE)
    positions = torch.tensor([23, 22, 21, 20, 7], device=DEVICE)
    k2, v2 = k.clone(), v.clone()
    got = decode_attention_step_triton(
        qkv, k, v, LAYER, slots, positions, n_head, rope_theta=10000.0, write_first=write_first
    )
    want = decode_attention_step_reference(qkv, k2, v2, LAYER, slots, positions, n_head, rope_theta=10000.0)
    torch.testing.assert_close(k, k2, **FP32)  # the caches end alike either way
    if write_first:
        torch.testing.assert_close(got, want, **FP32)
    else:  # the row at 23 (first program) attended before 20-22 were written: stale keys there
        assert not torch.allclose(got[0], want[0], **FP32)
        torch.testing.assert_close(got[3:], want[3:], **FP32)  # position 20 reads no round key; the other slot's row
