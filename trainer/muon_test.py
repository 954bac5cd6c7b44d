import copy
import re

import pytest
import torch

from trainer.config import TrainConfig
from trainer.muon import NS_COEFFS, Muon, MuonAdamW, newton_schulz
from trainer.testing import fast_config
from trainer.train import make_optimizer, train
from model.presets import get_preset
from model.transformer import GPT


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 48, 16)])
def test_newton_schulz_leaves_singular_values_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * 3.0
    o = newton_schulz(g).float()
    assert o.shape == g.shape and newton_schulz(g).dtype == torch.bfloat16
    s, s_in = torch.linalg.svdvals(o), torch.linalg.svdvals(g)
    # The quintic iteration trades exactness for speed: 5 steps put every singular value in about [0.7, 1.2], except
    # those far below the matrix's norm (the first step's slope is a = 3.44, so 5 steps lift x by at most ~490x).
    assert s.max() < 1.25, s.max()
    clear = s_in / g.flatten(-2).norm(dim=-1, keepdim=True) > 3e-3
    assert clear.float().mean() > 0.9 and s[clear].min() > 0.6, (s[clear].min(), clear.float().mean())
    # and it keeps the singular vectors: O is close to U V^T of g
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.97


def _reference_ns(g: torch.Tensor, steps: int) -> torch.Tensor:
    """One matrix at a time, no batching, in the plain order of the algorithm, in float64."""
    a, b, c = NS_COEFFS
    if g.shape[0] > g.shape[1]:
        return _reference_ns(g.T, steps).T
    x = g.double() / (g.double().norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def test_newton_schulz_in_bfloat16_follows_the_float32_iteration():
    torch.manual_seed(3)
    g = torch.randn(40, 24)
    a, b, c = NS_COEFFS
    x = g.T / g.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    fast = newton_schulz(g).float()
    assert (fast - x.T).norm() / x.norm() < 0.05  # bf16's 8-bit mantissa: ~3% measured


def _reference_muon(weights, grads_per_step, lr, momentum, wd):
    """Muon by the book, one parameter and one step at a time."""
    weights = [w.clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(weights, grads)):
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            nesterov = (1 - momentum) * g + momentum * bufs[i]
            o = _reference_ns(nesterov, 5)
            scale = max(1.0, w.shape[0] / w.shape[1]) ** 0.5
            weights[i] = w.double() * (1 - lr * wd) - lr * scale * o
    return weights


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_muon_step_matches_a_slow_reference(wd):
    torch.manual_seed(1)
    shapes = [(48, 16), (16, 48), (16, 16), (16, 16), (48, 16)]  # batched by shape inside Muon
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads_per_step = [[torch.randn(s) for s in shapes] for _ in range(3)]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=wd, ns_dtype=torch.float32)  # bf16: tested apart
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = _reference_muon(start, grads_per_step, 0.05, 0.9, wd)
    for p, e, s in zip(params, expected, start):
        assert (e - s).norm() > 0.05  # it moved
        torch.testing.assert_close(p.detach(), e.float(), rtol=0, atol=1e-5)


def test_muon_takes_a_tensor_learning_rate_as_a_float():
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.randn(8, 24))
    b = torch.nn.Parameter(a.detach().clone())
    g = torch.randn(8, 24)
    a.grad, b.grad = g.clone(), g.clone()
    Muon([a], lr=0.03, weight_decay=0.1).step()
    Muon([b], lr=torch.tensor(0.03), weight_decay=0.1).step()
    torch.testing.assert_close(a, b)


def test_muon_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"Muon steps 2-D matrices only, got a parameter of shape \(8,\)"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


def test_muon_adamw_splits_the_model_and_round_trips_its_state():
    cfg = fast_config(optimizer="muon", muon_lr=0.03)
    model = GPT(get_preset("tiny", vocab_size=32, block_size=16))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    adamw, muon = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert muon_names and all(n.startswith("blocks.") and n.endswith("_proj.weight") for n in muon_names)
    assert "tok_emb.weight" in adamw_names and not muon_names & adamw_names
    assert muon_names | adamw_names == set(names.values())
    assert [g["base_lr"] for g in opt.param_groups] == [cfg.lr] * len(adamw.param_groups) + [0.03]

    x = torch.randint(0, 32, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())  # torch's load_state_dict would share the tensors otherwise
    assert sorted(saved["state"]) == list(range(len(names)))
    twin = GPT(get_preset("tiny", vocab_size=32, block_size=16))
    twin.load_state_dict(model.state_dict())
    other = make_optimizer(twin, cfg, torch.device("cpu"))
    other.load_state_dict(saved)
    for o in (opt, other):
        (model if o is opt else twin)(x, x)[1].backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_trainer_trains_a_tiny_model_with_muon(small_corpus, dirs):
    result = train(fast_config(optimizer="muon", muon_lr=0.02, lr=3e-3, max_steps=24, decay="trapezoid",
                               warmdown_steps=8), small_corpus, **dirs)  # fmt: skip
    assert result.stopped == "completed" and result.model_id
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(optimizer="sgd"), "optimizer must be one of ['adamw', 'muon'], got 'sgd'"),
        (dict(muon_lr=0.0), "muon_lr must be a number in (0.0, 10.0], got 0.0"),
        (dict(muon_momentum=1.0), "muon_momentum must be a number in [0.0, 0.9999], got 1.0"),
        (dict(muon_weight_decay=-1), "muon_weight_decay must be a number in [0.0, 10.0], got -1"),
    ],
)
def test_optimizer_settings_are_validated(changes, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        TrainConfig(**changes)
