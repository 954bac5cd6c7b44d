"""The one-launch sampler (Triton; the CPU interpreter here) against the PyTorch path, token for token."""

import math

import pytest
import torch

from inference_svc.runner import SlotState, Staging
from kernels.sampling import MAX_VOCAB, SlotSettings, advance_slots, sample_slots_triton
from model.sampling import MAX_SEED, SamplingParams, penalise, sample_rows, sample_slots, uniforms
from model import sampling as model_sampling
from model.sampling import sample_slots_reference as reference

GPU = torch.cuda.is_available()


def _state(n_slots: int, V: int, gen: torch.Generator, device: str) -> SlotSettings:
    """Random per-slot settings covering the edges: greedy rows, top_k 1 / off (V) / in between, top_p tiny / 1 /
    in between, penalties 1 and not, seeds small and near 2**63, a few blocked ids."""

    def pick(*choices: torch.Tensor) -> torch.Tensor:
        which = torch.randint(0, len(choices), choices[0].shape, generator=gen)
        return torch.stack(choices).gather(0, which[None])[0]

    shape = (n_slots, 1)
    state = dict(
        blocked=torch.arange(V) >= V - 2,
        seen=torch.rand(n_slots, V, generator=gen) < 0.2,
        penalty=pick(torch.ones(shape), 0.3 + 2 * torch.rand(shape, generator=gen)),
        greedy=torch.rand(n_slots, generator=gen) < 0.15,
        temperature=pick(0.2 + 1.5 * torch.rand(shape, generator=gen), torch.full(shape, 0.01), torch.ones(shape)),
        top_k=pick(
            torch.full(shape, V), torch.ones(shape, dtype=torch.long), torch.randint(1, max(V, 2), shape, generator=gen)
        ),
        top_p=pick(torch.ones(shape), torch.full(shape, 1e-6), torch.rand(shape, generator=gen)),
        seed=pick(torch.randint(0, 1 << 20, (n_slots,), generator=gen), MAX_SEED - torch.arange(n_slots)),
    )
    return SlotSettings(**{k: v.to(device) for k, v in state.items()})


def _logits(B: int, V: int, gen: torch.Generator, device: str, scale: float = 3.0) -> torch.Tensor:
    """Random rows, a third with ties (values on a coarse grid), some -inf entries, one NaN row, one +inf entry,
    one all -inf row, one row of all-equal values."""
    logits = scale * torch.randn(B, V, generator=gen)
    coarse = torch.rand(B, generator=gen) < 0.33
    logits[coarse] = (logits[coarse] * 2).round() / 2
    logits[torch.rand(B, V, generator=gen) < 0.05] = float("-inf")
    if B >= 5:
        logits[0, V // 3] = float("nan")
        logits[1, V // 2] = float("inf")
        logits[2] = float("-inf")
        logits[3] = 1.25
        logits[4, :] = float("-inf")
        logits[4, V - 5] = 2.0  # one finite token
    return logits.to(device)


def _exact(logits: torch.Tensor, slots: torch.Tensor, counters: torch.Tensor, st: SlotSettings) -> torch.Tensor:
    """The torch path with the scaled logits' softmax, cumsum and draw in float64: the token that exact arithmetic on
    the same float32 inputs gives, where torch's float32 cumsum has drifted across a boundary."""
    logits = penalise(logits.masked_fill(st.blocked, float("-inf")), st.seen[slots], st.penalty[slots])
    x = (logits / st.temperature[slots]).double()  # the float32 division, as torch and the kernel do it
    ones = torch.ones_like(x[:, :1])
    u = uniforms(st.seed[slots], counters).double()
    return sample_rows(x, st.greedy[slots], ones, st.top_k[slots], st.top_p[slots].double(), u)


def _compare(
    B: int, V: int, n_slots: int, seed: int, device: str, edit=None, scale: float = 3.0, adjacent_ok: bool = False
) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = _state(n_slots, V, gen, device)
    if edit is not None:
        edit(state)
    logits = _logits(B, V, gen, device, scale)
    slots = torch.randperm(n_slots, generator=gen)[:B].to(device)
    counters = torch.randint(0, 1 << 40, (B,), generator=gen).to(device)
    fast = sample_slots_triton(logits, slots, counters, state)
    ref = reference(logits, slots, counters, state)
    bad = ((fast != ref) & (fast != _exact(logits, slots, counters, state))).nonzero()[:, 0].tolist()
    if adjacent_ok and bad:  # a nearly flat row: the draw lands within rounding of a boundary between two neighbours
        scaled = penalise(logits.masked_fill(state.blocked, float("-inf")), state.seen[slots], state.penalty[slots])
        order = torch.sort(scaled[bad] / state.temperature[slots][bad], dim=-1, descending=True, stable=True).indices
        rank = lambda ids: (order == ids[:, None]).float().argmax(-1)  # noqa: E731
        bad = [b for b, gap in zip(bad, (rank(fast[bad]) - rank(ref[bad])).abs().tolist()) if gap > 1]
    assert not bad, f"rows {bad}: kernel {fast[bad].tolist()} vs torch {ref[bad].tolist()}"
    # Rounding decides a boundary in a rare row only; in flat rows (adjacent_ok) more often, by how the autotuner's
    # tile sums the row: 4 of 512 flat 50k-id rows (H200, third session), 14 of 512 (eleventh, 8 test processes
    # sharing the GPU while it tuned); a kernel off by one rank everywhere would match almost none.
    assert (fast == ref).float().mean() > (0.9 if adjacent_ok else 0.99)
    assert ((fast >= 0) & (fast < V)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_small_vocab(seed, device):
    _compare(B=48 if not GPU else 4096, V=65, n_slots=64 if not GPU else 4100, seed=seed, device=device)


@pytest.mark.parametrize("V", [1000, 50304])
def test_matches_torch_large_vocab(V, device):
    B = 8 if not GPU else 512  # rows 0-4 are the edge rows of _logits
    _compare(B=B, V=V, n_slots=B + 3, seed=V, device=device)


@pytest.mark.parametrize("top_k", [1, 50])
def test_large_vocab_small_top_k(top_k, device):
    """k far below V: top-k's coarse search narrows over several passes, then the kept tokens are listed."""

    def edit(state: SlotSettings) -> None:
        state.greedy[:] = False
        state.top_k[:] = top_k
        state.top_p[::2] = 0.9

    _compare(B=8 if not GPU else 512, V=50304, n_slots=9 if not GPU else 513, seed=top_k, device=device, edit=edit)


@pytest.mark.parametrize("scale", [3.0, 0.05], ids=["peaked", "flat"])
def test_large_vocab_top_p_only(scale, device):
    """top-k off: top-p's coarse search over the whole row stops early when few tokens carry the mass (peaked),
    or runs to the end and lists most of the row (flat)."""

    def edit(state: SlotSettings) -> None:
        state.greedy[:] = False
        state.top_k[:] = V
        state.top_p[:] = torch.tensor([0.5, 0.9, 0.99, 0.999])[torch.arange(len(state.top_p)) % 4, None]

    V, B = 50304, 7 if not GPU else 512
    # Flat rows: on the H200 4 of 512 draws took the neighbour (in sort order) of torch's, where the ~50k nearly
    # equal probabilities put a boundary within their rounding (Triton's exp and sum vs torch's softmax and cumsum).
    _compare(B=B, V=V, n_slots=B + 1, seed=int(scale * 100), device=device, edit=edit, scale=scale,
             adjacent_ok=scale < 1)  # fmt: skip


def test_single_token_vocab(device):
    _compare(B=3, V=1, n_slots=4, seed=5, device=device)


def test_sampled_rows_are_not_all_argmax(device):
    """Guards the comparison above against a kernel (and a state) that only ever returns the argmax."""
    gen = torch.Generator().manual_seed(3)
    B, V = 16, 65
    state = _state(B, V, gen, device)
    state.greedy[:] = False
    state.top_k[:] = V
    state.top_p[:] = 1.0
    state.temperature[:] = 1.0
    logits = torch.zeros(B, V, device=device)
    slots = torch.arange(B, device=device)
    fast = sample_slots_triton(logits, slots, slots, state)
    assert fast.unique().numel() > 4


def test_draws_follow_softmax(device):
    """Chi-square: one slot drawn at many counters gives the tempered, top-p softmax's frequencies (top-k's cut is
    exact by construction and compared token for token above)."""
    V, n = 6, 160 if not GPU else 20_000  # the interpreter runs ~0.3 s a row
    logits_row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -3.0])
    state = dict(
        blocked=torch.zeros(V, dtype=torch.bool),
        seen=torch.zeros(1, V, dtype=torch.bool),
        penalty=torch.ones(1, 1),
        greedy=torch.zeros(1, dtype=torch.bool),
        temperature=torch.full((1, 1), 1.25),
        top_k=torch.full((1, 1), V),
        top_p=torch.full((1, 1), 0.9),
        seed=torch.tensor([12345]),
    )
    state = SlotSettings(**{k: v.to(device) for k, v in state.items()})
    logits = logits_row.expand(n, V).contiguous().to(device)
    slots = torch.zeros(n, dtype=torch.long, device=device)
    counters = torch.arange(n, device=device)
    counts = torch.bincount(sample_slots_triton(logits, slots, counters, state), minlength=V).cpu().double()
    probs = torch.softmax(logits_row / 1.25, dim=0).double()
    kept = (torch.cumsum(probs, 0) - probs) < 0.9
    assert not kept.all()  # the test covers a top-p cut
    expected = torch.where(kept, probs, 0.0) / probs[kept].sum() * n
    assert counts[expected == 0].sum() == 0, f"drew a token outside top-k / top-p: {counts.tolist()}"
    live = expected > 0
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    dof = int(live.sum()) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 10, f"chi2={chi2:.1f} for {dof} dof: {counts.tolist()}"


def test_slot_state_routes_to_kernel(device, monkeypatch):
    """SlotState.sample's full path is the kernel ("triton") and equals its PyTorch path ("reference")."""
    V, n_slots = 65, 9
    state = SlotState(n_slots, V, torch.device(device))
    state.allow(V - 1)
    params = [
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.3, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, top_p=0.5, seed=2),
        SamplingParams(temperature=0.7, repetition_penalty=0.5, seed=3),
    ]
    slots = torch.tensor([4, 0, 7, 2], device=device)
    prompts = [[1, 2, 3], [5], [6, 6, 7], [8, 9, 10, 11]]
    state.admit(Staging(torch.device(device)), slots, params, [p.seed or 0 for p in params], prompts)
    gen = torch.Generator().manual_seed(7)
    calls = []
    monkeypatch.setattr(  # where model.sampling.sample_slots looks it up
        model_sampling, "sample_slots_triton", lambda *a, **k: calls.append(1) or sample_slots_triton(*a, **k)
    )
    for step in range(6):
        logits = (2 * torch.randn(4, V, generator=gen)).to(device)
        counters = torch.full((4,), 10 + step, device=device)
        state.impl = "triton"
        fast = state.sample(logits, slots, counters, full=True)
        state.impl = "reference"
        assert torch.equal(fast, state.sample(logits, slots, counters, full=True)), step
        assert not fast.eq(V - 1).any()  # the blocked id
        state.advance(slots, fast, counters, full=True)
    assert len(calls) == 6


@pytest.mark.parametrize("full", [True, False])
def test_advance_matches_torch(full, device):
    """The state update: next tokens and positions by slot, and (full) the new tokens joining the seen masks;
    300 rows span three programs."""
    gen = torch.Generator().manual_seed(int(full))
    n_slots, V, B = 400, 65, 300
    state = [
        torch.randint(0, V, (n_slots,), generator=gen),
        torch.randint(0, 99, (n_slots,), generator=gen),
        torch.rand(n_slots, V, generator=gen) < 0.3,
    ]
    state = [t.to(device) for t in state]
    slots = torch.randperm(n_slots, generator=gen)[:B].to(device)
    tokens = torch.randint(0, V, (B,), generator=gen).to(device)
    positions = torch.randint(0, 1000, (B,), generator=gen).to(device)
    want = [t.clone() for t in state]
    advance_slots(*want, slots, tokens, positions, full, impl="reference")
    advance_slots(*state, slots, tokens, positions, full, impl="triton")
    for got, ref in zip(state, want):
        assert torch.equal(got, ref)
    assert full == bool(state[2][slots, tokens].all())  # the test covers a change of the mask, or none


def test_auto_takes_reference_on_cpu_tensors():
    gen = torch.Generator().manual_seed(0)
    state = _state(4, 65, gen, "cpu")
    logits, slots = torch.randn(4, 65, generator=gen), torch.arange(4)
    assert torch.equal(sample_slots(logits, slots, slots, state), reference(logits, slots, slots, state))


@pytest.mark.parametrize(
    "logits, match",
    [
        (torch.zeros(2, 3, dtype=torch.float16), "float32"),
        (torch.zeros(2, MAX_VOCAB + 1), "vocabulary V"),
    ],
    ids=["dtype", "vocab"],
)
def test_bad_input_is_named(logits, match):
    B, V = logits.shape
    state = _state(B, min(V, 8), torch.Generator().manual_seed(0), "cpu")
    state = state._replace(seen=torch.zeros(B, V, dtype=torch.bool))
    with pytest.raises(ValueError, match=match):
        sample_slots_triton(logits, torch.arange(B), torch.arange(B), state)


def test_bad_counters_are_named():
    state = _state(2, 8, torch.Generator().manual_seed(0), "cpu")
    with pytest.raises(ValueError, match="counters"):
        sample_slots_triton(torch.zeros(2, 8), torch.arange(2), torch.arange(3), state)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_captured_in_cuda_graph_matches_torch():
    gen = torch.Generator().manual_seed(11)
    B, V = 64, 50304
    state = _state(B + 1, V, gen, "cuda")
    logits = _logits(B, V, gen, "cuda")
    slots = torch.arange(B, device="cuda")
    counters = torch.arange(B, device="cuda") * 7
    sample_slots_triton(logits, slots, counters, state)  # autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample_slots_triton(logits, slots, counters, state)
    for step in range(3):
        logits.copy_(_logits(B, V, gen, "cuda"))
        counters += 1
        graph.replay()
        assert torch.equal(out, reference(logits, slots, counters, state)), step
