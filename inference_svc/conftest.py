"""Shared fixtures: a tiny random-init GPT with a character tokenizer, saved as an artifact in a tmp store.

The token embedding (tied to the LM head) is scaled up so that the untrained model's logits are spread
out: greedy choices then never hinge on a float rounding difference between a batched engine step and
the reference's single-sequence step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.artifact import load_artifact, save_artifact
from model.presets import get_preset
from model.tokenizers import CharTokenizer
from model.transformer import GPT

CORPUS = "to be, or not to be: that is the question. whether 'tis nobler in the mind to suffer!"


@dataclass(frozen=True)
class TinyModel:
    store: Path  # the artifact store root
    model_id: str
    path: Path  # the artifact folder
    model: GPT  # as loaded from the artifact (float32, CPU, eval)
    tokenizer: CharTokenizer
    corpus: str  # the text the tokenizer was built from


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    tokenizer = CharTokenizer.from_corpus(CORPUS)
    torch.manual_seed(1234)
    model = GPT(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        model.tok_emb.weight.mul_(10.0)
    store = tmp_path_factory.mktemp("store")
    model_id = save_artifact(store, model, tokenizer, name="tiny-test", preset="tiny", metrics={"val_loss": 3.5})
    artifact = load_artifact(store / model_id)
    return TinyModel(
        store=store, model_id=model_id, path=store / model_id, model=artifact.model, tokenizer=tokenizer, corpus=CORPUS
    )
