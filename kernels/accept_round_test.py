"""A sampled speculative round's acceptance in one launch (Triton; the interpreter on CPU) against its PyTorch
reference (`probabilities` over every position, `accept_sampled`, the context mask: what the runner ran before):
fresh random rounds mixing greedy and sampled rows, top-k 1 / 50 / V, top-p 0.5 / 0.95 / 1, temperatures 0.5 / 1.3,
with and without repetition-penalty rows, drafts near the target (some accepted, some not), q equal to p (every
draft stands), tied and peaked logits, a row whose logits are not numbers; counts, tokens and masks EQUAL (no
tolerance: the kernel's probabilities differ from torch's by an ulp or so, which moves an outcome only when a uniform
lies within ~1e-7 of a boundary, never seen in these cases). And the property itself: the emitted first token's
frequencies over many rounds follow the target's distribution, not the draft's (chi-square). On a GPU the same
tests run the compiled kernel."""

import pytest
import torch

from kernels.accept_round import MAX_VOCAB, accept_round, probabilities
from kernels.draft_steps import inverse_cdf
from model.testing import chi2_critical_999, chi2_statistic

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel in the interpreter on CPU; on a GPU, compiled


def _settings(g: torch.Generator, b: int, V: int) -> dict:
    """Each row's sampler settings, picked at random; row 0 always sampled (a batch of 1 tests the sampled path)."""
    pick = lambda options: torch.tensor(options)[torch.randint(0, len(options), (b, 1), generator=g)]  # noqa: E731
    greedy = torch.rand(b, generator=g) < 0.3
    greedy[0] = False
    return dict(
        greedy=greedy,
        temperature=pick([0.5, 1.3]).float(),
        top_k=pick([1, 50, V]),
        top_p=pick([0.5, 0.95, 1.0]).float(),
    )


def _contexts(seen: torch.Tensor | None, drafts: torch.Tensor) -> torch.Tensor | None:
    """(b, k + 1, V) the context before each position: seen, then the drafts one by one."""
    if seen is None:
        return None
    out = [seen]
    for j in range(drafts.shape[1]):
        out.append(out[-1].scatter(1, drafts[:, j : j + 1], True))
    return torch.stack(out, dim=1)


def _target_p(logits, seen_all, penalty, s) -> torch.Tensor:
    """The reference's distributions (b, k + 1, V) at every position (for drafts drawn from q = p)."""
    b, n, V = logits.shape
    rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
    p = probabilities(
        logits.flatten(0, 1),
        None if seen_all is None else seen_all.flatten(0, 1),
        None if penalty is None else rep(penalty),
        rep(s["greedy"]),
        rep(s["temperature"]),
        rep(s["top_k"]),
        rep(s["top_p"]),
    )
    return p.view(b, n, V)


def _round(seed: int, b: int, k: int, V: int, penalised: bool, q_is_p: bool = False, logits=None):
    """A random round: (logits, drafts, q, u_accept, u_new) and the keyword settings. The draft's q is the target's
    scaled logits plus noise (rows accept some drafts and reject others), or p itself (`q_is_p`); drafts are drawn
    from q by inverse CDF, as a draft does; the last 3 ids blocked (-inf)."""
    g = torch.Generator().manual_seed(seed)
    if logits is None:
        logits = torch.randn(b, k + 1, V, generator=g) * 3.0
    logits[:, :, -3:] = float("-inf")
    s = _settings(g, b, V)
    seen = penalty = None
    if penalised:
        seen = torch.rand(b, V, generator=g) < 0.2
        penalty = torch.tensor([1.0, 1.6, 0.7])[torch.randint(0, 3, (b, 1), generator=g)]
    u_draft = torch.rand(b, k, generator=g)
    if q_is_p:  # drafts drawn one after the other from p, whose context they extend
        drafts = torch.zeros(b, k, dtype=torch.long)
        for j in range(k):
            p = _target_p(logits, _contexts(seen, drafts), penalty, s)[:, j]  # position j: drafts[:, :j] only
            drafts[:, j] = inverse_cdf(p, u_draft[:, j])
        q = _target_p(logits, _contexts(seen, drafts), penalty, s)[:, :k]
    else:
        noisy = (
            logits[:, :k].nan_to_num(nan=0.0) / s["temperature"][:, :, None] + torch.randn(b, k, V, generator=g) * 0.7
        )
        q = torch.softmax(noisy, dim=-1)
        drafts = inverse_cdf(q.flatten(0, 1), u_draft.flatten()).view(b, k)
    u_accept, u_new = torch.rand(b, k, generator=g), torch.rand(b, k + 1, generator=g)
    s.update(seen=seen, penalty=penalty)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [to(t) for t in (logits, drafts, q, u_accept, u_new)], {name: to(t) for name, t in s.items()}


def _both(args, kw) -> tuple[tuple, tuple]:
    got = accept_round(*args, **kw, impl="triton")
    want = accept_round(*args, **kw, impl="reference")
    assert len(got) == len(want) == (3 if kw["seen"] is not None else 2)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (g, w)
    return got, want


# (seed, b, k, V, penalised): every b, k, V and penalty at least twice, not their whole product (the interpreter)
CASES = [
    (0, 1, 1, 65, False),
    (1, 3, 4, 300, True),
    (2, 3, 1, 300, False),
    (3, 1, 4, 65, True),
    (4, 3, 4, 65, False),
    (5, 3, 1, 65, True),
    (6, 1, 4, 300, False),
    (7, 3, 4, 300, True),
]


@pytest.mark.parametrize("seed, b, k, V, penalised", CASES)
def test_equals_the_reference_on_random_rounds(seed, b, k, V, penalised):
    (accepted, tokens, *mask), _ = _both(*_round(seed, b, k, V, penalised))
    assert accepted.shape == (b,) and tokens.shape == (b, k + 1)
    assert torch.equal(tokens[:, k], tokens.gather(1, accepted[:, None])[:, 0])  # the new token at `accepted` and k


def test_contexts_built_by_the_caller_are_read_as_the_rounds():
    """seen may come as every position's context (b, k + 1, V), as the runner's draft loop builds them: the same
    outcome and mask as from the context through x_n; the reference reads them as given (garbage in the later
    contexts shows), the kernel reads the first only."""
    args, kw = _round(1, 3, 4, 300, True)
    want = accept_round(*args, **kw, impl="reference")
    contexts = _contexts(kw["seen"], args[1])
    for impl in ("reference", "triton"):
        got = accept_round(*args, **{**kw, "seen": contexts}, impl=impl)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    contexts[:, 1:] = True  # every id seen from position 1 on
    assert not torch.equal(accept_round(*args, **{**kw, "seen": contexts}, impl="reference")[2], want[2])


def test_the_cases_reach_every_outcome():
    """The random cases are not degenerate: over them, rows accept none, some and all of their drafts, and the
    penalty changes some row's distribution (its tokens or count differ with the penalty dropped)."""
    counts, penalty_matters = set(), False
    for seed, b, k, V, penalised in CASES:
        args, kw = _round(seed, b, k, V, penalised)
        accepted, tokens, *_ = accept_round(*args, **kw, impl="reference")
        counts |= {a / k for a in accepted.tolist()}
        if penalised:
            plain = accept_round(*args, **{**kw, "seen": None, "penalty": None}, impl="reference")
            penalty_matters |= not torch.equal(plain[1], tokens)
    assert 0.0 in counts and 1.0 in counts and len(counts) > 2, counts
    assert penalty_matters


@pytest.mark.parametrize("penalised", [False, True])
def test_drafts_from_p_itself_all_stand(penalised):
    """q == p (drafts drawn from the target's own distributions): u * p(d) < p(d) for every draft, so every row
    accepts all k, and the new token comes from p at position k."""
    k = 3
    (accepted, tokens, *_), _ = _both(*_round(11, 3, k, 65, penalised, q_is_p=True))
    assert accepted.tolist() == [k] * 3


def test_tied_peaked_and_broken_logits():
    """Integer logits (many exact ties: top-k and top-p cut inside a tie, which the stable order resolves by the lower
    id), a row peaked on one id, and a row with a NaN (not a number: the one-hot fallback on its argmax, the NaN)."""
    b, k, V = 3, 2, 65
    g = torch.Generator().manual_seed(12)
    logits = torch.randint(-2, 3, (b, k + 1, V), generator=g).float()
    logits[1, :, 7] = 40.0
    logits[2, 1, 5] = float("nan")
    args, kw = _round(12, b, k, V, True, logits=logits)
    kw.update(greedy=torch.zeros(b, dtype=torch.bool, device=DEVICE), top_k=torch.tensor([[20], [V], [3]]).to(DEVICE))
    kw["top_p"] = torch.tensor([[0.3], [0.9], [1.0]]).to(DEVICE)
    _both(args, kw)
    kw["greedy"] = torch.ones(b, dtype=torch.bool, device=DEVICE)  # every row greedy: argmaxes, ties to the lower id
    _both(args, kw)


# (temperature, top_k, top_p, penalty) of the grid test's row groups
GRID_SETTINGS = [(1.0, 5, 1.0, 1.0), (0.5, 65, 0.6, 1.0), (1.3, 3, 0.9, 1.6), (1.3, 12, 0.95, 0.7)]


def test_each_distribution_read_back_by_inverse_cdf_on_a_grid():
    """The kernel's distributions themselves, not only a few random outcomes: every row drafts an id the target never
    keeps (q one-hot on the lowest-ranked id, outside every top-k here), so it rejects at position 0 and draws its new
    token from p_0 alone with u_new on a grid of 24 points; tokens equal for every grid point means the CDFs agree to
    1/24 of mass at every id (a top-k or top-p cut one token off, a wrong penalty or temperature moves them more)."""
    n, V = 24, 65
    g = torch.Generator().manual_seed(14)
    base = torch.randn(2, V, generator=g) * 2.0
    b = n * len(GRID_SETTINGS)
    column = lambda i: torch.tensor([row[i] for row in GRID_SETTINGS]).repeat_interleave(n)[:, None]  # noqa: E731
    kw = dict(
        greedy=torch.zeros(b, dtype=torch.bool),
        temperature=column(0).float(),
        top_k=column(1).long(),
        top_p=column(2).float(),
        seen=(torch.rand(1, V, generator=g) < 0.3).expand(b, V).clone(),
        penalty=column(3).float(),
    )
    drafts = base[0].argmin().expand(b, 1).clone()
    q = torch.zeros(b, 1, V).scatter_(2, drafts[:, :, None], 1.0)
    grid = ((torch.arange(n) + 0.5) / n).repeat(len(GRID_SETTINGS))
    args = [base.expand(b, 2, V).clone(), drafts, q, torch.zeros(b, 1), torch.stack([grid, grid], dim=1)]
    (accepted, tokens, _), _ = _both([t.to(DEVICE) for t in args], {name: t.to(DEVICE) for name, t in kw.items()})
    assert accepted.tolist() == [0] * b
    for group in tokens[:, 0].view(len(GRID_SETTINGS), n).tolist():
        assert len(set(group)) > 1  # the grid spans more than one id in each group


def test_the_first_token_follows_the_target_not_the_draft():
    """Rejection sampling's guarantee, on the kernel: many rounds over the same logits (V = 6, k = 2, the draft's q far
    from p), each with its own uniforms; the first emitted token's frequencies match p at position 0 (chi-square at
    the 0.1% level, fixed seed), and fail against q (the test can tell them apart)."""
    n, k, V = 500, 2, 6
    g = torch.Generator().manual_seed(13)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -0.5]).expand(n, k + 1, V).clone()
    q_row = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.1, 0.1])
    q = q_row.expand(n, k, V).clone()
    drafts = inverse_cdf(q.flatten(0, 1), torch.rand(n * k, generator=g)).view(n, k)
    settings = dict(
        greedy=torch.zeros(n, dtype=torch.bool),
        temperature=torch.full((n, 1), 1.0),
        top_k=torch.full((n, 1), V),
        top_p=torch.full((n, 1), 1.0),
    )
    args = [logits, drafts, q, torch.rand(n, k, generator=g), torch.rand(n, k + 1, generator=g)]
    settings = {name: t.to(DEVICE) for name, t in settings.items()}
    accepted, tokens = accept_round(*(t.to(DEVICE) for t in args), **settings, impl="triton")
    first = tokens[:, 0].cpu()
    counts = torch.bincount(first, minlength=V).float()
    p0 = torch.softmax(logits[0, 0], dim=-1)
    stat, df = chi2_statistic(counts, p0)
    assert stat < chi2_critical_999(df), (counts, p0 * n)
    stat_q, df_q = chi2_statistic(counts, q_row)
    assert stat_q > chi2_critical_999(df_q)
    assert 0 < (accepted > 0).float().mean() < 1


def test_bad_arguments_are_refused_by_name():
    args, kw = _round(0, 2, 2, 65, True)
    with pytest.raises(ValueError, match="drafts must be"):
        accept_round(args[0], args[1][:, :1], *args[2:], **kw)
    with pytest.raises(ValueError, match="top_k must be"):
        accept_round(*args, **{**kw, "top_k": kw["top_k"].float()})
    with pytest.raises(ValueError, match="seen and penalty go together"):
        accept_round(*args, **{**kw, "penalty": None})
    with pytest.raises(ValueError, match="impl must be"):
        accept_round(*args, **kw, impl="fast")
    V = MAX_VOCAB + 1
    big, big_kw = _round(0, 1, 1, V, False)
    with pytest.raises(ValueError, match="impl='triton'"):
        accept_round(*big, **big_kw, impl="triton")
    accept_round(*big, **big_kw)  # "auto": the reference past the kernel's vocabulary
