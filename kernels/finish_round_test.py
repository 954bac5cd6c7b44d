"""A speculative round's tail in one launch (`finish_round`, Triton; the interpreter on CPU) against its PyTorch
reference (mask, argmax, `accept_greedy`, the new token's gather, the position's where, the carried token's gather,
the state's index_put, the output's cat: what the round ran before): greedy mode over fresh random logits with exact
ties (integer logits), a blocked id that would win, a NaN (blocked and not), float32 and bfloat16, drafts standing
for every count 0 .. k; given mode (the acceptance's counts and tokens); padded rows on the scratch slot; with and
without the draft's carried token. Outputs and every state entry EQUAL (all integers). On a GPU the same tests run
the compiled kernel."""

import pytest
import torch

from kernels.accept_round import MAX_VOCAB, finish_round

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel in the interpreter on CPU; on a GPU, compiled
S, SCRATCH = 17, 16  # slots in the state (the last one the scratch slot)


def _rows_extras(g: torch.Generator, b: int, k: int, V: int) -> dict:
    """Each row's first input x0 and its position."""
    return dict(x0=torch.randint(0, V, (b,), generator=g), pos=torch.randint(0, 40, (b,), generator=g))


def _greedy_case(seed: int, b: int, k: int, V: int, dtype=torch.float32) -> dict:
    """Integer logits (ties everywhere: the first maximum wins), id 3 blocked and the largest where it appears, row 1
    with a NaN at position 0 (its argmax) and a blocked NaN at position 1 (masked away first); each row's drafts equal
    the target's ids for a prefix of a length cycling over 0 .. k, then differ."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (b, k + 1, V), generator=g).float()
    blocked = torch.zeros(V, dtype=torch.bool)
    blocked[3] = True
    logits[:, :, 3] = 50.0  # would win every position, were it not blocked
    if b > 1:
        logits[1, 0, 9] = float("nan")
        logits[1, 1, 3] = float("nan")
    logits = logits.to(dtype)
    target = logits.float().masked_fill(blocked, float("-inf")).argmax(dim=-1)  # (b, k + 1)
    drafts = target[:, :k].clone()
    for r in range(b):
        stand = r % (k + 1)
        if stand < k:  # the first draft that differs from the target's id
            drafts[r, stand] = (drafts[r, stand] + 1 + torch.randint(0, V - 1, (), generator=g)) % V
    return dict(logits=logits, blocked=blocked, drafts=drafts, **_rows_extras(g, b, k, V))


def _given_case(seed: int, b: int, k: int, V: int) -> dict:
    """The acceptance's counts (cycling over 0 .. k) and tokens, random drafts."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        accepted=torch.arange(b) % (k + 1),
        tokens=torch.randint(0, V, (b, k + 1), generator=g),
        drafts=torch.randint(0, V, (b, k), generator=g),
        **_rows_extras(g, b, k, V),
    )


def _call(case: dict, rows: list[int], prev: bool, impl: str) -> tuple[torch.Tensor, ...]:
    """One finish_round over fresh state (random entries: the untouched ones must stay); (out, token, pos, prev)."""
    g = torch.Generator().manual_seed(99)
    b, k = case["drafts"].shape
    token_state, pos_state, prev_state = (torch.randint(1, 1000, (S,), generator=g).to(DEVICE) for _ in range(3))
    out = torch.full((b, k + 2), -7, dtype=torch.long, device=DEVICE)
    kw = {name: t.to(DEVICE) for name, t in case.items()}
    got = finish_round(
        torch.tensor(rows, device=DEVICE),
        kw.pop("x0"),
        kw.pop("pos"),
        kw.pop("drafts"),
        **kw,
        scratch=SCRATCH,
        token_state=token_state,
        pos_state=pos_state,
        prev_state=prev_state if prev else None,
        out=out,
        impl=impl,
    )
    assert got is out
    return out, token_state, pos_state, prev_state


def _both(case: dict, rows: list[int], prev: bool, shared: int | None = None) -> tuple[torch.Tensor, ...]:
    """The kernel's results EQUAL the reference's (output, each state); returns the kernel's. `shared`: a slot that
    several rows write (the padded rows' scratch slot), whose token and carried token may be any of theirs (the
    rows' programs run in no set order on a GPU); its position is compared (every such row writes 0)."""
    want = _call(case, rows, prev, "reference")
    got = _call(case, rows, prev, "triton")
    keep = [s for s in range(S) if s != shared]
    for name, w, g in zip(("out", "token_state", "pos_state", "prev_state"), want, got):
        same = torch.equal(g, w) if name in ("out", "pos_state") else torch.equal(g[keep], w[keep])
        assert same, (name, g, w)
    return got


def _owed(case: dict, rows: list[int], got: tuple[torch.Tensor, ...], prev: bool) -> None:
    """Each real row's entries against the definition (not the reference): the new token tokens[accepted], position
    pos + accepted + 1, the carried token x0 or the last accepted draft; the output (accepted + 1, tokens)."""
    out, token_state, pos_state, prev_state = (t.cpu() for t in got)
    accepted, tokens = out[:, 0] - 1, out[:, 1:]
    if "accepted" in case:
        assert torch.equal(accepted, case["accepted"]) and torch.equal(tokens, case["tokens"])
    for r, slot in enumerate(rows):
        if slot == SCRATCH:
            continue
        a = int(accepted[r])
        assert token_state[slot] == tokens[r, a] and pos_state[slot] == case["pos"][r] + a + 1
        if prev:
            assert prev_state[slot] == (case["x0"][r] if a == 0 else case["drafts"][r, a - 1])


@pytest.mark.parametrize("prev", [False, True])
@pytest.mark.parametrize("k, V", [(1, 65), (3, 65), (4, 1000)])
def test_greedy_mode_equals_the_reference(k, V, prev):
    """Every accepted count 0 .. k appears; the tokens are the target's masked argmax (ties: the lower id; NaN: its
    id; the blocked winner never); the slots not in `rows` keep their entries (the reference's: random)."""
    b = 2 * (k + 1)
    case = _greedy_case(k + V, b, k, V)
    rows = [(5 * r + 3) % SCRATCH for r in range(b)]  # distinct slots, out of order
    got = _both(case, rows, prev)
    _owed(case, rows, got, prev)
    out = got[0].cpu()
    assert sorted(set((out[:, 0] - 1).tolist())) == list(range(k + 1))
    assert (out[:, 1:] != 3).all()  # the blocked id, largest everywhere, is never the target's
    assert out[1, 1] == 9  # row 1's NaN at position 0 is its argmax
    target = case["logits"].masked_fill(case["blocked"], float("-inf")).argmax(dim=-1)
    assert torch.equal(out[:, 1:], target)


@pytest.mark.parametrize("prev", [False, True])
def test_greedy_mode_reads_bfloat16_logits_as_float32(prev):
    k, V = 3, 65
    case = _greedy_case(5, 4, k, V, dtype=torch.bfloat16)
    rows = [2, 0, 5, 7]
    got = _both(case, rows, prev)
    _owed(case, rows, got, prev)
    assert sorted((got[0][:, 0] - 1).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("prev", [False, True])
def test_given_mode_equals_the_reference(prev):
    """The acceptance's counts and tokens: the new token is tokens[accepted], the carried one x0 or drafts[accepted -
    1], the position pos + accepted + 1."""
    k, b = 4, 5
    case = _given_case(7, b, k, 65)
    rows = [6, 1, 0, 4, 2]
    _owed(case, rows, _both(case, rows, prev), prev)


@pytest.mark.parametrize("greedy", [False, True])
def test_padded_rows_on_the_scratch_slot_leave_it_at_position_0(greedy):
    """A bucket of 6 with 3 real rows: the padded rows all write the scratch slot (any of their tokens; position 0);
    the real rows' output and every other slot's entries equal those of the unpadded call."""
    k, V = 3, 65
    case = _greedy_case(11, 6, k, V) if greedy else _given_case(11, 6, k, V)
    real = {name: t if name == "blocked" else t[:3] for name, t in case.items()}
    rows = [5, 0, 2]
    padded = _both(case, rows + [SCRATCH] * 3, True, shared=SCRATCH)
    alone = _both(real, rows, True)
    assert padded[2][SCRATCH] == 0
    assert torch.equal(padded[0][:3], alone[0])
    keep = [s for s in range(S) if s != SCRATCH]
    for p, a in zip(padded[1:], alone[1:]):  # token, pos, prev
        assert torch.equal(p[keep], a[keep])
    _owed(case, rows + [SCRATCH] * 3, padded, True)


def test_bad_arguments_are_refused_by_name():
    k, V, b = 2, 65, 3
    case = _greedy_case(0, b, k, V)
    base = dict(
        rows=torch.arange(b, device=DEVICE),
        x0=case["x0"].to(DEVICE),
        pos=case["pos"].to(DEVICE),
        drafts=case["drafts"].to(DEVICE),
        logits=case["logits"].to(DEVICE),
        blocked=case["blocked"].to(DEVICE),
        scratch=SCRATCH,
        token_state=torch.zeros(S, dtype=torch.long, device=DEVICE),
        pos_state=torch.zeros(S, dtype=torch.long, device=DEVICE),
        out=torch.zeros(b, k + 2, dtype=torch.long, device=DEVICE),
    )

    def call(**changes):
        kw = {**base, **changes}
        return finish_round(kw.pop("rows"), kw.pop("x0"), kw.pop("pos"), kw.pop("drafts"), **kw)

    call()
    cases = [
        (dict(drafts=base["drafts"][:, 0]), "drafts must be"),
        (dict(rows=base["rows"].int()), "rows must be"),
        (dict(pos=base["pos"][:2]), "pos must be"),
        (dict(logits=base["logits"][:, :k]), "logits must be"),
        (dict(logits=base["logits"].double()), "logits must be"),
        (dict(blocked=base["blocked"].long()), "blocked must be"),
        (dict(accepted=base["x0"]), "either logits"),
        (dict(logits=None, blocked=None), "either logits"),
        (dict(token_state=base["token_state"].float()), "token_state must be"),
        (dict(pos_state=base["pos_state"][:4]), "pos_state must be"),
        (dict(prev_state=base["pos_state"].int()), "prev_state must be"),
        (dict(out=base["out"][:, 1:]), "out must be"),
        (dict(scratch=S), "scratch must be"),
        (dict(scratch=-1), "scratch must be"),
        (dict(impl="fast"), "impl must be"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**changes)
    given = dict(logits=None, blocked=None, accepted=base["x0"])
    with pytest.raises(ValueError, match="tokens must be"):
        call(**given, tokens=base["drafts"])
    big = torch.zeros(b, k + 1, MAX_VOCAB + 1, device=DEVICE)
    big_blocked = torch.zeros(MAX_VOCAB + 1, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="impl='triton'"):
        call(logits=big, blocked=big_blocked, impl="triton")
    call(logits=big, blocked=big_blocked)  # "auto": the reference past the kernel's vocabulary
