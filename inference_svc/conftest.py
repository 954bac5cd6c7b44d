"""Shared fixtures: a tiny random-init GPT with a character tokenizer (model.testing.save_tiny_model, logits spread
out so greedy choices never hinge on rounding), saved as an artifact in a tmp store. Where there is no GPU, Triton
kernels forced on (impl "triton", e.g. the speculative runner's draft_kernel) run in the interpreter: TRITON_INTERPRET
must be set before triton is first imported, hence here, at conftest import (as model/conftest.py)."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model.artifact import load_artifact  # noqa: E402  (after TRITON_INTERPRET: model imports triton)
from model.testing import TINY_CORPUS, save_tiny_model  # noqa: E402
from model.tokenizers import CharTokenizer  # noqa: E402
from model.transformer import GPT  # noqa: E402


@dataclass(frozen=True)
class TinyModel:
    store: Path  # the artifact store root
    model_id: str
    path: Path  # the artifact folder
    model: GPT  # as loaded from the artifact (float32, CPU, eval)
    tokenizer: CharTokenizer
    corpus: str  # the text the tokenizer was built from

    def copy(self) -> GPT:
        """A copy of the model for a runner on another device or dtype: a TorchRunner moves its model in place, and
        the session's model must stay float32 on the CPU for the tests that come after (on a GPU machine too)."""
        return copy.deepcopy(self.model)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    store = tmp_path_factory.mktemp("store")
    model_id, tokenizer = save_tiny_model(store)
    artifact = load_artifact(store / model_id)
    return TinyModel(
        store=store,
        model_id=model_id,
        path=store / model_id,
        model=artifact.model,
        tokenizer=tokenizer,
        corpus=TINY_CORPUS,
    )
