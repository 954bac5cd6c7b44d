import numpy as np
import torch
import torch.nn.functional as F

from model.presets import get_preset
from model.transformer import GPT
from trainer.evaluate import split_loss


def _model(vocab: int = 17) -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("tiny", vocab_size=vocab, block_size=16, n_layer=2, n_embd=32, n_head=2))


def test_every_token_is_scored_once_with_its_own_window_as_context():
    model = _model()
    tokens = np.random.default_rng(0).integers(0, 17, size=16 * 3 + 6)  # 3 whole windows and a short last one
    got = split_loss(model, tokens, 16, torch.device("cpu"), batch_size=2)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, 16):  # the reference: one window at a time
            n = min(16, len(tokens) - 1 - s)
            x = torch.tensor(tokens[s : s + n])[None]
            y = torch.tensor(tokens[s + 1 : s + n + 1])
            logits, _ = model(x)
            total += F.cross_entropy(logits[0], y, reduction="sum").item()
            count += n
    assert count == len(tokens) - 1
    assert abs(got - total / count) < 1e-5


def test_batching_does_not_change_the_figure_and_mode_is_restored():
    model = _model().train()
    tokens = np.random.default_rng(1).integers(0, 17, size=100)
    a = split_loss(model, tokens, 16, torch.device("cpu"), batch_size=1)
    b = split_loss(model, tokens, 16, torch.device("cpu"), batch_size=64)
    assert abs(a - b) < 1e-5 and model.training
