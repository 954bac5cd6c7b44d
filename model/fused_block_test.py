"""The fused residual + norm path of the model (GPT.forward with our kernels: every residual add runs in one kernel
with the norm after it) gives the loss and every parameter's gradient of the plain unfused model, GPT-2 (LayerNorm)
and Llama (RMSNorm) flavours.

The weights are moved away from their init first (norm weights of 1 and biases of 0 would hide a kernel that
ignored them, or mixed up which norm reads which sum). Attention keeps PyTorch's SDPA here (its kernel has its own
tests), so the only difference between the two runs is the fused add + norm. On CPU the kernels run in Triton's
interpreter (model/conftest.py); the GPU tests skip without one."""

import pytest
import torch

from kernels import fused_add_norm
from model import layers
from model.presets import get_preset
from model.kv_cache import KVCache
from model.testing import assert_grads_close
from model.transformer import GPT

FLAVOURS = {
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_head=4, n_kv_head=2),
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, n_head=2, n_kv_head=2),
}
VOCAB, T = 48, 12
GPU = torch.cuda.is_available()


def trained_like(flavour: str, n_layer: int, n_embd: int, device: str) -> GPT:
    """A model whose every weight is perturbed away from init, as training would leave it."""
    torch.manual_seed(0)
    config = get_preset(
        "tiny", n_layer=n_layer, n_embd=n_embd, block_size=T, vocab_size=VOCAB, dropout=0.0, **FLAVOURS[flavour]
    )
    model = GPT(config).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def kernels_but_attention(monkeypatch, impl: str) -> list[tuple]:
    """Our kernels forced on for every op but attention (unless use_kernels(False)), untuned (the config does not
    change the result); returns the list the fused add + norm calls land in."""
    monkeypatch.setattr(fused_add_norm, "AUTOTUNE", False)
    on = lambda t, kernel: "attention" not in kernel and layers._KERNELS_ON.get() is not False
    monkeypatch.setattr(layers, "_kernel_impl", lambda t, kernel: impl if on(t, kernel) else None)
    calls = []
    real = fused_add_norm.AddNormFunction.apply
    monkeypatch.setattr(fused_add_norm.AddNormFunction, "apply", lambda *a: calls.append(a[1] is not None) or real(*a))
    return calls


def loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(idx, targets)
    loss.backward()
    return loss.item(), {name: p.grad.float().clone() for name, p in model.named_parameters()}


def batch(device: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (rows, T), generator=g)
    targets = torch.randint(0, VOCAB, (rows, T), generator=g)
    return idx.to(device), targets.to(device)


@pytest.mark.skipif(GPU, reason="forces Triton's CPU interpreter; with a GPU the GPU tests below run the real kernels")
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_fused_model_matches_unfused_on_cpu(flavour, monkeypatch):
    n_layer = 2
    model = trained_like(flavour, n_layer=n_layer, n_embd=40, device="cpu")  # 40: not a power of two
    idx, targets = batch("cpu", rows=3)
    with layers.use_kernels(False):
        ref_loss, ref_grads = loss_and_grads(model, idx, targets)
    calls = kernels_but_attention(monkeypatch, "triton")
    loss, grads = loss_and_grads(model, idx, targets)

    # one plain norm (block 0's norm_1), then two fused add + norm calls per block (the last into norm_f)
    assert calls == [False] + [True] * (2 * n_layer), calls
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.skipif(GPU, reason="forces Triton's CPU interpreter")
def test_checkpointing_keeps_the_unfused_path(monkeypatch):
    model = trained_like("gpt2", n_layer=2, n_embd=32, device="cpu")
    idx, targets = batch("cpu", rows=2)
    with layers.use_kernels(False):
        ref_loss, ref_grads = loss_and_grads(model, idx, targets)
    calls = kernels_but_attention(monkeypatch, "triton")
    model.gradient_checkpointing = True
    loss, grads = loss_and_grads(model, idx, targets)
    assert calls and not any(calls), "with checkpointing every norm is a plain norm (no residual add fused)"
    assert abs(loss - ref_loss) < 1e-5
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, atol=1e-5, rtol=1e-4)


def test_plain_path_when_kernels_do_not_apply(monkeypatch):
    """CPU without forced kernels (as torch.compile and the exporters see the model): no fused call at all, and the
    parameter names are the model's usual ones."""
    model = trained_like("llama", n_layer=2, n_embd=32, device="cpu")
    calls = []
    monkeypatch.setattr(fused_add_norm.AddNormFunction, "apply", lambda *a: calls.append(a))
    idx, targets = batch("cpu", rows=2)
    loss, grads = loss_and_grads(model, idx, targets)
    assert calls == [] and torch.isfinite(torch.tensor(loss))
    assert "blocks.1.norm_2.weight" in grads and "norm_f.weight" in grads


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the compiled Triton kernels")
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_fused_model_matches_unfused_on_gpu_fp32(flavour, monkeypatch):
    """fp32 on the GPU: SDPA and cuBLAS are the same in both runs, so only the fused norms differ: tight."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = trained_like(flavour, n_layer=3, n_embd=384, device="cuda")
    idx, targets = batch("cuda", rows=8)
    with layers.use_kernels(False):
        ref_loss, ref_grads = loss_and_grads(model, idx, targets)
    calls = kernels_but_attention(monkeypatch, "auto")
    loss, grads = loss_and_grads(model, idx, targets)
    assert calls == [False] + [True] * 6, calls
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    assert_grads_close(grads, ref_grads, 1e-4)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the compiled Triton kernels")
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_fused_model_matches_unfused_on_gpu_bf16_autocast(flavour, monkeypatch):
    """bf16 autocast, as the trainer runs: an fp32 residual stream with bf16 sublayer outputs."""
    model = trained_like(flavour, n_layer=3, n_embd=384, device="cuda")
    idx, targets = batch("cuda", rows=8)
    with layers.use_kernels(False):
        ref_loss, ref_grads = loss_and_grads(model, idx, targets, autocast=True)
    calls = kernels_but_attention(monkeypatch, "auto")
    loss, grads = loss_and_grads(model, idx, targets, autocast=True)
    assert calls == [False] + [True] * 6, calls
    assert abs(loss - ref_loss) < 1e-2 * ref_loss, (loss, ref_loss)
    assert_grads_close(grads, ref_grads, 3e-2)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_cached_forward_fused_matches_unfused(flavour, monkeypatch):
    """forward_cached (prefill, then a decode step) takes the fused add + norm form too (the serving engine's graphs)."""
    device = "cuda" if GPU else "cpu"
    model = trained_like(flavour, n_layer=2, n_embd=40, device=device).eval()
    idx, _ = batch(device, rows=3)
    slots, zero = torch.tensor([2, 0, 1], device=device), torch.zeros(3, dtype=torch.long, device=device)
    outs = []
    for fused in (False, True):
        if fused:
            kernels_but_attention(monkeypatch, "triton" if not GPU else "auto")
            calls, real = [], fused_add_norm._forward  # no autograd here: the kernels are launched directly
            monkeypatch.setattr(fused_add_norm, "_forward", lambda *a: calls.append(a[1] is not None) or real(*a))
        cache = KVCache(3, model.config, device=device)
        with torch.no_grad(), layers.use_kernels(fused):
            prefill = model.forward_cached(idx[:, :-1], cache, slots, zero, last_only=True)
            step = model.forward_cached(idx[:, -1:], cache, slots, zero + T - 1)
        outs.append((prefill, step))
    assert calls == ([False] + [True] * 4) * 2, calls
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
