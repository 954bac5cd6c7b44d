"""One draft step's sampling in one launch (`draft_sample`, Triton; the interpreter on CPU) against its PyTorch
reference (mask, `probabilities`, `inverse_cdf`, the mask's scatter: what the speculative draft loop ran), and the
round's uniforms in one launch (`uniform_grid`) against `uniforms`.

draft_sample: fresh random logits at V = 65 (shakespeare-char) and 1000 (not a power of two), float32 and bfloat16,
read through strided (B, V) views of (B, n, V) as the draft loop passes them; rows mixing greedy, temperature 0.5 /
1.3, top-k, top-p and top_p = 1, a blocked id, with and without the repetition penalty; q to 1e-6 (the kernel's exp
and softmax sum differ from torch's by an ulp), tokens and masks EQUAL. Rows that are not numbers fall back to the
one-hot as the reference does. The draw itself: many draws over one row's q follow q (chi-square). uniform_grid: bit
for bit, at seeds past 2**32 and counters past the round's 2**29 tags. On a GPU the same tests run the compiled
kernels."""

import pytest
import torch

from kernels.accept_round import MAX_VOCAB, draft_sample, uniform_grid
from model.sampling import uniforms
from model.testing import chi2_critical_999, chi2_statistic

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel in the interpreter on CPU; on a GPU, compiled

# (greedy, temperature, top_k (0: V), top_p, penalty) of the random cases' rows, one row each
ROWS = [
    (False, 1.0, 0, 1.0, 1.6),  # plain softmax (top-k and top-p off)
    (True, 1.0, 0, 1.0, 1.0),  # greedy
    (False, 0.5, 0, 1.0, 0.7),  # cold
    (False, 1.3, 5, 1.0, 1.0),  # top-k
    (False, 1.3, 0, 0.5, 1.6),  # top-p
    (False, 0.5, 50, 0.95, 1.2),  # both
    (True, 0.5, 3, 0.9, 0.7),  # greedy whatever its other settings
]


def _inputs(seed: int, V: int, dtype: torch.dtype, penalised: bool, rows=ROWS, logits: torch.Tensor | None = None):
    """(logits, blocked, u) and the keyword settings of one call. logits a (B, V) view of a (B, 2, V) tensor (row
    stride 2V, as `forward_cached(...)[:, 0]` but with a gap); ids 3 and V - 1 blocked."""
    g = torch.Generator().manual_seed(seed)
    b = len(rows)
    if logits is None:
        logits = torch.randn(b, V, generator=g) * 3.0
    wide = torch.zeros(b, 2, V, dtype=dtype)
    wide[:, 1] = logits.to(dtype)
    blocked = torch.zeros(V, dtype=torch.bool)
    blocked[[3, V - 1]] = True
    column = lambda i, dt: torch.tensor([r[i] for r in rows], dtype=dt)  # noqa: E731
    kw = dict(
        greedy=column(0, torch.bool),
        temperature=column(1, torch.float32)[:, None],
        top_k=torch.tensor([r[2] or V for r in rows], dtype=torch.long)[:, None],
        top_p=column(3, torch.float32)[:, None],
        seen=(torch.rand(b, V, generator=g) < 0.3) if penalised else None,
        penalty=column(4, torch.float32)[:, None] if penalised else None,
    )
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    u = torch.rand(b, 3, generator=g)[:, 1]  # a column of a (B, 3) grid, as the round's uniforms are read
    args = [wide.to(DEVICE)[:, 1], blocked.to(DEVICE), u.to(DEVICE)]
    return args, {name: to(t) for name, t in kw.items()}


def _both(args, kw) -> tuple[tuple, tuple]:
    """The kernel and the reference on the same inputs: q within 1e-6, tokens and masks equal."""
    got = draft_sample(*args, **kw, impl="triton")
    want = draft_sample(*args, **kw, impl="reference")
    b, V = args[0].shape
    assert got[0].shape == (b, V) and got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    assert got[1].dtype == torch.long and torch.equal(got[1], want[1]), (got[1], want[1])
    if kw["seen"] is None:
        assert got[2] is None and want[2] is None
    else:
        assert got[2].dtype == torch.bool and torch.equal(got[2], want[2])
        assert torch.equal(got[2], kw["seen"].scatter(1, got[1][:, None], True))
    return got, want


@pytest.mark.parametrize("penalised", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [65, 1000])
def test_equals_the_reference_on_random_rows(V, dtype, penalised):
    args, kw = _inputs(V + penalised, V, dtype, penalised)
    assert args[0].stride() == (2 * V, 1)  # a view with a gap between rows
    (q, token, _), _ = _both(args, kw)
    assert torch.allclose(q.sum(dim=1), torch.ones(len(ROWS), device=q.device), atol=1e-5)
    assert (q[:, [3, V - 1]] == 0).all() and not (token == 3).any()  # blocked ids
    greedy = kw["greedy"]
    assert ((q[greedy] == 1.0).sum(dim=1) == 1).all()  # one-hot on the greedy rows
    assert ((q[[0, 3, 4]] > 0).sum(dim=1) > 1).all()  # sampled rows spread (the cold ones may peak on one id)
    assert (q[3] > 0).sum() == 5  # top-k 5


def test_the_penalty_and_the_uniform_change_the_outcome():
    """The cases are not blind to the penalty and the draw: dropping the penalty changes q, and other uniforms pick
    other tokens (so equal tokens above are more than a coincidence of the argmax)."""
    args, kw = _inputs(1, 65, torch.float32, True)
    q, token, _ = draft_sample(*args, **kw, impl="triton")
    plain, _, _ = draft_sample(*args, **{**kw, "seen": None, "penalty": None}, impl="triton")
    assert not torch.allclose(q, plain, atol=1e-3)
    others = draft_sample(args[0], args[1], 1.0 - args[2], **kw, impl="triton")[1]
    assert not torch.equal(others[~kw["greedy"]], token[~kw["greedy"]])


def test_rows_that_are_not_numbers_fall_back_to_the_argmax():
    """A NaN (its first NaN), a +inf (the softmax is NaN), every id -inf (argmax 0), and all -inf but one id (a
    proper distribution: one-hot there, sampled or not); all sampled rows but for one greedy twin."""
    V = 65
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(3))
    logits[0, [7, 9]] = float("nan")
    logits[1, 11] = float("inf")
    logits[2] = float("-inf")
    logits[3] = float("-inf")
    logits[3, 20] = -4.0
    logits[4, 30] = float("nan")
    rows = [(False, 1.3, 0, 0.9, 1.6)] * 4 + [(True, 1.0, 0, 1.0, 1.0)]
    args, kw = _inputs(3, V, torch.float32, True, rows=rows, logits=logits)
    (q, token, _), _ = _both(args, kw)
    assert token.tolist() == [7, 11, 0, 20, 30]
    assert torch.equal(q, torch.nn.functional.one_hot(token, V).float())


def test_tied_logits_cut_inside_a_tie_by_the_lower_id():
    """Integer logits (many exact ties): top-k and top-p cut inside a tie, which torch's stable sort resolves by the
    lower id; the kernel's composite order must agree."""
    V = 65
    logits = torch.randint(-2, 3, (4, V), generator=torch.Generator().manual_seed(4)).float()
    rows = [(False, 1.0, 20, 1.0, 1.0), (False, 1.0, 0, 0.3, 1.0), (False, 0.5, 7, 0.8, 1.6), (True, 1.0, 0, 1.0, 1.0)]
    _both(*_inputs(4, V, torch.float32, True, rows=rows, logits=logits))


def test_a_batch_of_zero_rows():
    args, kw = _inputs(0, 65, torch.float32, True, rows=[])
    q, token, seen_after = draft_sample(*args, **kw, impl="triton")
    assert q.shape == (0, 65) and token.shape == (0,) and seen_after.shape == (0, 65)


def test_the_draws_follow_q():
    """Many draws through the kernel, each row the same logits with its own uniform: the tokens' frequencies match
    the kernel's q (chi-square at the 0.1% level, fixed seed), and fail against the distribution without top-p and
    temperature (the test can tell them apart)."""
    n, V = 600, 8
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -0.5, 1.5, -3.0]).expand(n, V)
    args, kw = _inputs(5, V, torch.float32, False, rows=[(False, 0.8, 0, 0.9, 1.0)] * n, logits=logits)
    q, token, _ = draft_sample(*args, **kw, impl="triton")
    assert torch.equal(q, q[:1].expand(n, V))
    counts = torch.bincount(token.cpu(), minlength=V).float()
    stat, df = chi2_statistic(counts, q[0].cpu())
    assert stat < chi2_critical_999(df), (counts, q[0] * n)
    stat_plain, df_plain = chi2_statistic(counts, torch.softmax(logits[0].masked_fill(args[1].cpu(), -1e9), dim=0))
    assert stat_plain > chi2_critical_999(df_plain)


def test_bad_arguments_are_refused_by_name():
    args, kw = _inputs(0, 65, torch.float32, True)
    logits, blocked, u = args
    cases = [
        ("logits must be", (logits[None], blocked, u), kw),
        ("logits must be", (logits.long(), blocked, u), kw),
        ("blocked must be", (logits, blocked[:-1], u), kw),
        ("u must be", (logits, blocked, u.double()), kw),
        ("greedy must be", (logits, blocked, u), {**kw, "greedy": kw["greedy"].long()}),
        ("temperature must be", (logits, blocked, u), {**kw, "temperature": kw["temperature"][:, 0]}),
        ("top_k must be", (logits, blocked, u), {**kw, "top_k": kw["top_k"].float()}),
        ("top_p must be", (logits, blocked, u), {**kw, "top_p": kw["top_p"][:-1]}),
        ("seen must be", (logits, blocked, u), {**kw, "seen": kw["seen"][:, :-1]}),
        ("penalty must be", (logits, blocked, u), {**kw, "penalty": kw["penalty"].half()}),
        ("seen and penalty go together", (logits, blocked, u), {**kw, "penalty": None}),
    ]
    for message, a, k in cases:
        with pytest.raises(ValueError, match=message):
            draft_sample(*a, **k)
    with pytest.raises(ValueError, match="impl must be"):
        draft_sample(*args, **kw, impl="fast")
    big, big_kw = _inputs(0, MAX_VOCAB + 1, torch.float32, False, rows=ROWS[:1])
    with pytest.raises(ValueError, match="impl='triton'"):
        draft_sample(*big, **big_kw, impl="triton")
    assert draft_sample(*big, **big_kw)[0].shape == (1, MAX_VOCAB + 1)  # "auto": the reference past the kernel's V


def _round_offsets(k: int) -> torch.Tensor:
    """The counters' offsets of a round's draws, as `round_uniforms` builds them: tags 1, 2, 3 << 29 plus 1 .. k,
    1 .. k, 1 .. k + 1."""
    tags = ((1 << 29, k), (2 << 29, k), (3 << 29, k + 1))
    return torch.cat([torch.arange(1 + tag, n + 1 + tag) for tag, n in tags])


def test_uniform_grid_equals_uniforms_bit_for_bit():
    """Random seeds over the whole int64 range (past 2**32: the high word is hashed too) and positions near the round's
    2**29 tags and past 2**32 (the counter's low 32 bits), at a round's offsets (k = 4) and at a wide random grid that
    takes several programs a row."""
    g = torch.Generator().manual_seed(6)
    seed = torch.cat(
        [torch.tensor([0, 1, (1 << 32) - 1, 1 << 32, (1 << 63) - 1]), torch.randint(0, 1 << 62, (7,), generator=g)]
    )
    pos = torch.tensor(
        [0, 5, (1 << 29) - 2, 1 << 29, (3 << 29) + 1, (1 << 32) - 3, 1 << 33, 17, 100, 4095, 12, 1 << 30]
    )
    wide = torch.randint(0, 1 << 31, (300,), generator=g)
    for offsets in (_round_offsets(4), wide):
        got = uniform_grid(seed.to(DEVICE), pos.to(DEVICE), offsets.to(DEVICE), impl="triton")
        counters = pos[:, None] + offsets[None, :]
        want = uniforms(seed[:, None].expand_as(counters).reshape(-1), counters.reshape(-1)).view(counters.shape)
        assert got.dtype == torch.float32 and torch.equal(got.cpu(), want)
        assert torch.equal(uniform_grid(seed, pos, offsets, impl="reference"), want)
    assert len(set(got.flatten().tolist())) > 0.99 * got.numel()  # draws, not a constant


def test_uniform_grid_is_what_a_round_draws():
    """The lead's call, uniform_grid(seed, pos, offsets of the round), equals `round_uniforms`, the runner's chain."""
    from inference_svc.speculative_resident import round_uniforms

    seed, pos = torch.tensor([3, 1 << 40, 99]), torch.tensor([0, 250, 1 << 20])
    for k in (1, 4):
        got = uniform_grid(seed.to(DEVICE), pos.to(DEVICE), _round_offsets(k).to(DEVICE), impl="triton")
        assert torch.equal(got.cpu(), round_uniforms(seed, pos, k))


def test_uniform_grid_refuses_bad_arguments_by_name():
    seed, pos, offsets = torch.tensor([1, 2]), torch.tensor([3, 4]), _round_offsets(2)
    with pytest.raises(ValueError, match="seed must be"):
        uniform_grid(seed.int(), pos, offsets)
    with pytest.raises(ValueError, match="pos must be"):
        uniform_grid(seed, pos[:1], offsets)
    with pytest.raises(ValueError, match="offsets must be"):
        uniform_grid(seed, pos, offsets[None])
    with pytest.raises(ValueError, match="impl must be"):
        uniform_grid(seed, pos, offsets, impl="fast")
    assert uniform_grid(seed, pos, offsets[:0], impl="triton").shape == (2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_in_a_cuda_graph_as_a_round_runs_them():
    """uniform_grid then draft_sample on a column of its grid, captured once and replayed over new logits and
    positions: the replays equal the eager references (no host sync, no value-dependent allocation in either)."""
    V, k = 65, 4
    args, kw = _inputs(7, V, torch.bfloat16, True)
    logits = args[0]
    b = logits.shape[0]
    seed = torch.arange(b, device="cuda") * 1_000_003 + (1 << 40)
    pos = torch.arange(b, device="cuda") * 11
    offsets = _round_offsets(k).cuda()

    def run():
        u = uniform_grid(seed, pos, offsets)
        return (u, *draft_sample(logits, args[1], u[:, 1], **kw))

    run()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    g = torch.Generator(device="cuda").manual_seed(8)
    for step in range(3):
        logits.copy_(torch.randn(b, V, generator=g, device="cuda") * 3.0)
        pos += 1
        graph.replay()
        u = uniform_grid(seed, pos, offsets, impl="reference")
        want = draft_sample(logits, args[1], u[:, 1], **kw, impl="reference")
        assert torch.equal(out[0], u), step
        torch.testing.assert_close(out[1], want[0], atol=1e-6, rtol=0)
        assert torch.equal(out[2], want[1]) and torch.equal(out[3], want[2]), step
