"""pytest set-up for bench_svc/benches/: kernel case modules import Triton, which runs through its CPU interpreter
where there is no GPU (TRITON_INTERPRET must be set before triton is first imported, as kernels/conftest.py).

Fixtures: `one_thread` (the training benchmarks' tests, as trainer/conftest.py does for the trainer's) and `tiny`
(a saved random-init model for the serving benchmarks' tests, as inference_svc/conftest.py builds it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model.artifact import load_artifact  # noqa: E402  (after TRITON_INTERPRET: model imports triton)
from model.testing import save_tiny_model, single_thread  # noqa: E402
from model.tokenizers import CharTokenizer  # noqa: E402
from model.transformer import GPT  # noqa: E402


@pytest.fixture()
def one_thread():
    # The CI machine's 2 cores are shared with other suites; with 2 intra-op threads a loaded machine made tiny
    # training steps 10-30x slower (OpenMP threads spin-waiting on each other), with 1 they stay steady.
    with single_thread():
        yield


@dataclass(frozen=True)
class TinyModel:
    path: Path  # the artifact folder
    model: GPT  # as loaded from the artifact (float32, CPU, eval)
    tokenizer: CharTokenizer


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    """The serving tests' saved random-init model (model.testing.save_tiny_model)."""
    store = tmp_path_factory.mktemp("store")
    model_id, tokenizer = save_tiny_model(store)
    return TinyModel(path=store / model_id, model=load_artifact(store / model_id).model, tokenizer=tokenizer)
