"""model.layers routes the transformer's ops to kernels/: with the kernels forced on (Triton's interpreter on CPU),
the model gives the logits and gradients of the plain PyTorch path, for both the Llama and the GPT-2 flavour."""

import pytest
import torch

from model import layers
from model.presets import get_preset
from model.transformer import GPT

FLAVOURS = {
    "llama-gqa": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_head=4, n_kv_head=2),
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, n_head=2, n_kv_head=2),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="forces Triton's CPU interpreter; with a GPU the bf16 GPU test runs the real kernels")
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_kernel_path_matches_pytorch_path(flavour, monkeypatch):
    torch.manual_seed(0)
    config = get_preset("tiny", n_layer=1, n_embd=64, block_size=16, vocab_size=32, dropout=0.0, **FLAVOURS[flavour])
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    targets = torch.randint(0, config.vocab_size, (2, 16))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits, loss = model(idx, targets)
        loss.backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    with layers.use_kernels(False):
        ref_logits, ref_grads = run()
    calls = []
    monkeypatch.setattr(layers, "_kernel_impl", lambda t: calls.append(t.shape) or ("triton" if layers._KERNELS_ON.get() else None))
    kernel_logits, kernel_grads = run()

    assert len(calls) >= 3, "attention, norms and the MLP unit should each ask for a kernel"
    torch.testing.assert_close(kernel_logits, ref_logits, atol=2e-4, rtol=2e-4)
    for got, want in zip(kernel_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=5e-4, rtol=5e-3)


def test_use_kernels_false_keeps_pytorch(monkeypatch):
    seen = []
    monkeypatch.setattr(layers, "_kernel_impl", lambda t: seen.append(layers._KERNELS_ON.get()) or None)
    x = torch.randn(3, 8)
    with layers.use_kernels(False):
        out = layers.rms_norm(x, torch.ones(8), 1e-6)
    assert seen == [False]
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (8,), torch.ones(8), 1e-6))
    assert layers._KERNELS_ON.get() is True  # the scope ends with the block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the real kernels, compiled by Triton")
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_kernel_path_on_gpu_matches_pytorch_in_bf16(flavour):
    """On the GPU with bf16 autocast, the kernels' forward and backward match PyTorch's to bf16 rounding."""
    torch.manual_seed(1)
    config = get_preset("tiny", n_layer=2, n_embd=128, block_size=128, vocab_size=65, dropout=0.0, **FLAVOURS[flavour])
    model = GPT(config).cuda()
    idx = torch.randint(0, config.vocab_size, (4, 128), device="cuda")
    targets = torch.randint(0, config.vocab_size, (4, 128), device="cuda")

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx, targets)
        loss.backward()
        return logits.float().detach(), [p.grad.float().clone() for p in model.parameters()]

    with layers.use_kernels(False):
        ref_logits, ref_grads = run()
    logits, grads = run()
    assert torch.isfinite(logits).all()
    rel = (logits - ref_logits).norm() / ref_logits.norm()
    assert rel < 2e-2, f"logits differ by {rel:.2e} relative"
    # Relative to each gradient, floored at 1% of the typical one: some are ~0 in exact arithmetic (a key bias
    # shifts every score of a row alike), so their bf16 values are rounding noise on both paths.
    floor = 1e-2 * torch.stack([w.norm() for w in ref_grads]).median()
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        rel = (got - want).norm() / torch.maximum(want.norm(), floor)
        assert rel < 5e-2, f"grad of {name} differs by {rel:.2e} relative"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: trains on the real kernels")
def test_training_with_kernels_follows_pytorch_on_gpu():
    """150 AdamW steps of shakespeare-char (bf16 autocast, dropout 0.2) on a fixed batch schedule: the loss with
    the kernels on ends within 0.15 of the loss with them off (the two differ only by rounding and dropout draws)."""
    config = get_preset("shakespeare-char", vocab_size=65, dropout=0.2)
    g = torch.Generator().manual_seed(0)
    # learnable data: each token picks its successor from a fixed random table (noised 20% of the time), so the
    # loss falls well below log(65) = 4.17 within 150 steps
    table = torch.randint(0, 65, (65,), generator=g)
    batches = []
    for _ in range(150):
        seq = torch.empty(16, 257, dtype=torch.long)
        seq[:, 0] = torch.randint(0, 65, (16,), generator=g)
        for t in range(256):
            noise = torch.rand(16, generator=g) < 0.2
            seq[:, t + 1] = torch.where(noise, torch.randint(0, 65, (16,), generator=g), table[seq[:, t]])
        batches.append(seq)

    def final_loss(kernels: bool) -> float:
        torch.manual_seed(0)
        model = GPT(config).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        with layers.use_kernels(kernels):
            for batch in batches:
                batch = batch.cuda()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(batch[:, :-1], batch[:, 1:])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
        return sum(losses[-10:]) / 10

    off, on = final_loss(False), final_loss(True)
    assert off < 2.5, f"the PyTorch path itself did not learn the table (loss {off:.3f})"
    assert abs(on - off) < 0.15, f"kernels on: loss {on:.3f}, off: {off:.3f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the trainer's evaluation path")
def test_eval_loss_with_kernels_equals_pytorch_on_gpu():
    """shakespeare-char in eval mode (no dropout: attention takes the flash kernel) at the trainer's 64x256 batch:
    the loss with the kernels equals PyTorch's to bf16 rounding (the H100 trainer bench's eager runs reported
    rising eval losses)."""
    torch.manual_seed(0)
    model = GPT(get_preset("shakespeare-char", vocab_size=65)).cuda().eval()
    idx = torch.randint(0, 65, (64, 257), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with layers.use_kernels(False):
            _, ref = model(idx[:, :-1], idx[:, 1:])
        _, got = model(idx[:, :-1], idx[:, 1:])
    assert abs(got.item() - ref.item()) < 1e-2 * ref.item(), (got.item(), ref.item())
