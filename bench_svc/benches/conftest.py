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

from model.artifact import load_artifact, save_artifact  # noqa: E402  (after TRITON_INTERPRET: model imports triton)
from model.presets import get_preset  # noqa: E402
from model.tokenizers import CharTokenizer  # noqa: E402
from model.transformer import GPT  # noqa: E402

TINY_CORPUS = "to be, or not to be: that is the question. whether 'tis nobler in the mind to suffer!"


@pytest.fixture()
def one_thread():
    # The CI machine's 2 cores are shared with other suites; with 2 intra-op threads a loaded machine made tiny
    # training steps 10-30x slower (OpenMP threads spin-waiting on each other), with 1 they stay steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class TinyModel:
    path: Path  # the artifact folder
    model: GPT  # as loaded from the artifact (float32, CPU, eval)
    tokenizer: CharTokenizer


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    """A `tiny` GPT with a character tokenizer, saved as an artifact. Its token embedding (tied to the LM head) is
    scaled up so the untrained model's logits are spread out: greedy choices never hinge on a rounding difference
    between a batched engine step and a single-sequence one."""
    tokenizer = CharTokenizer.from_corpus(TINY_CORPUS)
    torch.manual_seed(1234)
    model = GPT(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        model.tok_emb.weight.mul_(10.0)
    store = tmp_path_factory.mktemp("store")
    model_id = save_artifact(store, model, tokenizer, name="tiny-test", preset="tiny", metrics={"val_loss": 3.5})
    return TinyModel(path=store / model_id, model=load_artifact(store / model_id).model, tokenizer=tokenizer)
