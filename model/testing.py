"""Helpers for tests of samplers: Pearson's chi-square with small cells pooled and its 0.1% critical value (the
engine's and the reference's speculative decoding are checked against exact probabilities), `single_thread`, and
`save_tiny_model` (the saved random-init model the serving tests run)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from pathlib import Path

import torch

from model.artifact import save_artifact
from model.config import ModelConfig
from model.presets import get_preset
from model.tokenizers import CharTokenizer
from model.transformer import GPT

__all__ = [
    "TINY_CORPUS",
    "chi2_critical_999",
    "chi2_statistic",
    "perturb_like_training",
    "save_tiny_model",
    "single_thread",
]

TINY_CORPUS = "to be, or not to be: that is the question. whether 'tis nobler in the mind to suffer!"

_Z_999 = 3.0902  # standard normal 0.999 quantile


def chi2_critical_999(df: int) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty: df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + _Z_999 * math.sqrt(h)) ** 3


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` (same shape, flattened), pooling the cells whose expected
    count is below 5 into one (so the chi-square approximation holds). Returns (statistic, degrees of freedom)."""
    n = counts.sum()
    expected, observed = (probs.flatten() * n).double(), counts.flatten().double()
    small = expected < 5
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    if expected[-1] < 5:  # the pooled cell is still small: fold it into the smallest other cell
        smallest = int(expected[:-1].argmin())
        expected[smallest] += expected[-1]
        observed[smallest] += observed[-1]
        expected, observed = expected[:-1], observed[:-1]
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Torch on one CPU thread for the scope: tiny models step fastest so, and do not stall a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_tiny_model(store: Path) -> tuple[str, CharTokenizer]:
    """A `tiny` GPT with a character tokenizer of TINY_CORPUS, saved as an artifact in `store`: (model id,
    tokenizer). Its token embedding (tied to the LM head) is scaled up so the untrained model's logits are spread
    out: greedy choices never hinge on a rounding difference between a batched engine step and a single-sequence one."""
    tokenizer = CharTokenizer.from_corpus(TINY_CORPUS)
    torch.manual_seed(1234)
    model = GPT(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        model.tok_emb.weight.mul_(10.0)
    model_id = save_artifact(store, model, tokenizer, name="tiny-test", preset="tiny", metrics={"val_loss": 3.5})
    return model_id, tokenizer


def assert_grads_close(grads: dict, ref_grads: dict, rel: float) -> None:
    """Every parameter's gradient within `rel` (relative norm of the difference) of the reference's, floored at 1% of
    the median gradient norm. A key projection's bias is the exception: its exact gradient is zero (it shifts every
    score of a row alike, which the softmax ignores), so on both paths its computed gradient is rounding noise from
    attention's backward: it must be small (under 5% of the median norm) on both, not equal."""
    assert grads.keys() == ref_grads.keys()
    median = torch.stack([g.float().norm() for n, g in ref_grads.items() if not n.endswith("k_proj.bias")]).median()
    for name, want in ref_grads.items():
        got, want = grads[name].float(), want.float()
        if name.endswith("k_proj.bias"):
            assert max(got.norm(), want.norm()) < 0.05 * median, f"grad of {name} is not ~0: {got.norm():.2e}"
            continue
        diff = (got - want).norm() / torch.maximum(want.norm(), 1e-2 * median)
        assert diff < rel, f"grad of {name} differs by {diff:.2e} relative"


def llama_test_config(vocab_size: int, block_size: int, **overrides) -> ModelConfig:
    """A two-layer Llama-flavoured model small enough for CPU tests: RMSNorm, RoPE, SwiGLU, GQA (4 query heads over 2
    K/V heads), width 32, no biases; `overrides` change any field."""
    base = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    return ModelConfig(**{**base, "vocab_size": vocab_size, "block_size": block_size, **overrides})


@torch.no_grad()
def perturb_like_training(model: GPT, seed: int = 0) -> GPT:
    """Move every weight away from its init, as training would (norm weights scaled by 1 + 0.3 randn, the rest moved
    by 0.05 randn): norm weights of 1 and biases of 0 would hide a kernel that ignored them. In place; returns model."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p)
        if "norm" in name and name.endswith("weight"):
            p.mul_(1 + 0.3 * noise)
        else:
            p.add_(0.05 * noise)
    return model
