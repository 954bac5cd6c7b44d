"""Shared fixtures: a briefly trained tiny model (needs TINYLM_CORPUS), its full export, random-init artifacts."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tools.ci_artifacts import train_tiny
from exporter.export import export_artifact
from exporter.parity import held_out_text
from model.artifact import save_artifact
from model.config import ModelConfig
from model.tokenizers import CharTokenizer
from model.transformer import GPT

TRAIN_STEPS = 150  # enough that quantization error shows up in the loss, and the gates mean something
SOURCE_FILES = ("config.json", "tokenizer.json", "model.safetensors", "manifest.json")
TEXT = "to be, or not to be: that is the question. whether 'tis nobler in the mind to suffer! " * 4


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)  # 2 cores shared with other suites: one thread each is the fastest on the whole


def source_hashes(artifact: Path) -> dict[str, str]:
    """sha256 of the files an export must never touch."""
    return {f: hashlib.sha256((artifact / f).read_bytes()).hexdigest() for f in SOURCE_FILES}


def listing(folder: Path) -> list[str]:
    """Every path under a folder, relative, sorted (to see that nothing was added or removed)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@dataclass(frozen=True)
class Trained:
    store: Path
    path: Path  # the artifact folder (never exported into; copy it first)
    corpus_text: str

    @property
    def eval_text(self) -> str:
        return held_out_text(self.corpus_text)

    def copy(self, dest: Path) -> Path:
        """A copy of the artifact, to export into."""
        target = dest / self.path.name
        shutil.copytree(self.path, target)
        return target


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    corpus = os.environ.get("TINYLM_CORPUS")
    if not corpus:
        pytest.skip("TINYLM_CORPUS is not set (the trained-model tests train on the Tiny Shakespeare text)")
    out = tmp_path_factory.mktemp("trained")
    model_id = train_tiny(Path(corpus), out, steps=TRAIN_STEPS)
    return Trained(
        store=out / "store", path=out / "store" / model_id, corpus_text=Path(corpus).read_text(encoding="utf-8")
    )


@dataclass(frozen=True)
class Exported:
    path: Path  # artifact folder holding every export
    report: dict[str, Any]
    hashes_before: dict[str, str]


@pytest.fixture(scope="session")
def exported(trained: Trained, tmp_path_factory) -> Exported:
    """The trained artifact exported to every format, gates on."""
    path = trained.copy(tmp_path_factory.mktemp("exported"))
    before = source_hashes(path)
    report = export_artifact(path, None, eval_text=trained.eval_text)
    return Exported(path=path, report=report, hashes_before=before)


def save_random(store: Path, config: ModelConfig, seed: int = 0, name: str = "random") -> Path:
    """A random-init model with a char tokenizer over TEXT, saved as an artifact; returns its folder."""
    tokenizer = CharTokenizer.from_corpus(TEXT)
    torch.manual_seed(seed)
    model = GPT(config.replace(vocab_size=tokenizer.vocab_size))
    return store / save_artifact(store, model, tokenizer, name=name, preset="tiny")


LLAMA_TINY = ModelConfig(
    vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, dropout=0.0,
    bias=False, norm="rmsnorm", pos="rope", mlp="swiglu", tie_weights=True,
)  # fmt: skip
GPT2_TINY = ModelConfig(
    vocab_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, block_size=64, dropout=0.0,
    bias=True, norm="layernorm", pos="learned", mlp="gelu", tie_weights=True,
)  # fmt: skip
