"""Fine-tuning a `SequenceClassifier`: the whole model, LoRA adapters (model/lora.py) + head, or the head alone.

Batches are drawn class-balanced (each class equally likely, then an example of it), so a classifier trained on a
skewed task cannot score well by answering the majority class; cross-entropy, AdamW, gradient clipping at 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.classifier import SequenceClassifier, pad_batch
from model.field_checks import check_choice, check_int, check_number
from model.lora import apply_lora

__all__ = ["FINETUNE_MODES", "FitConfig", "accuracy", "fit", "predict"]

log = logging.getLogger(__name__)

FINETUNE_MODES = ("full", "lora", "head")
Example = tuple[Sequence[int], int]  # (token ids, label)


@dataclass(frozen=True)
class FitConfig:
    """How to fine-tune. `lora_*` apply with finetune="lora" (adapters on q, k, v, o); lr is AdamW's."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_len: int = 64
    finetune: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "lora_rank"):
            check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0, 1, lo_open=True)
        check_number("weight_decay", self.weight_decay, 0, 1, hi_open=True)
        check_choice("finetune", self.finetune, FINETUNE_MODES)
        check_number("lora_alpha", self.lora_alpha, 0, lo_open=True)


def _trainable(clf: SequenceClassifier, config: FitConfig) -> list[torch.nn.Parameter]:
    """Set up the fine-tuning mode on `clf` (LoRA is applied in place) and return the parameters to train."""
    if config.finetune == "lora":
        apply_lora(clf.gpt, rank=config.lora_rank, alpha=config.lora_alpha, targets=("q", "k", "v", "o"))
    elif config.finetune == "head":
        clf.gpt.requires_grad_(False)
    return [p for p in clf.parameters() if p.requires_grad]


def fit(clf: SequenceClassifier, examples: Sequence[Example], config: FitConfig) -> list[float]:
    """Train `clf` in place on (ids, label) examples; returns the loss of every step."""
    labels = torch.tensor([label for _, label in examples])
    if len(examples) == 0 or int(labels.max()) >= clf.n_classes or int(labels.min()) < 0:
        raise ValueError(f"examples must be non-empty with labels in [0, {clf.n_classes})")
    by_class = [torch.nonzero(labels == c).flatten() for c in range(clf.n_classes)]
    present = [c for c in range(clf.n_classes) if len(by_class[c])]
    params = _trainable(clf, config)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    device = next(clf.parameters()).device
    clf.train()
    losses = []
    for step in range(config.steps):
        classes = torch.tensor(present)[torch.randint(len(present), (config.batch_size,), generator=gen)]
        rows = [int(by_class[c][torch.randint(len(by_class[c]), (1,), generator=gen)]) for c in classes.tolist()]
        ids, mask = pad_batch([examples[r][0] for r in rows], config.max_len)
        loss = F.cross_entropy(clf(ids.to(device), mask.to(device)), labels[rows].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log.info("step %d/%d loss %.3f", step + 1, config.steps, sum(losses[-50:]) / 50)
    clf.eval()
    return losses


@torch.no_grad()
def predict(clf: SequenceClassifier, seqs: Sequence[Sequence[int]], max_len: int, batch_size: int = 64) -> torch.Tensor:
    """The predicted label of each id list: (N,) long. Puts `clf` in eval mode."""
    clf.eval()
    device = next(clf.parameters()).device
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i : i + batch_size], max_len)
        out.append(clf(ids.to(device), mask.to(device)).argmax(dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(clf: SequenceClassifier, examples: Sequence[Example], max_len: int) -> float:
    """Fraction of (ids, label) examples whose predicted label is right."""
    predicted = predict(clf, [ids for ids, _ in examples], max_len)
    return float((predicted == torch.tensor([label for _, label in examples])).float().mean())
