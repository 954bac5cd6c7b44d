"""Shared fixtures: the real corpus (skips without TINYLM_CORPUS), a small synthetic one, run folders."""

import os
from pathlib import Path

import pytest
import torch

from trainer.testing import write_small_corpus


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The CI machine's 2 cores are shared with other suites; with 2 intra-op threads a loaded machine made
    # tiny steps 10-30x slower (OpenMP threads spin-waiting on each other), with 1 they stay steady.
    torch.set_num_threads(1)


@pytest.fixture()
def shakespeare() -> Path:
    path = os.environ.get("TINYLM_CORPUS")
    if not path:
        pytest.skip("TINYLM_CORPUS is not set (the Tiny Shakespeare text is needed)")
    return Path(path)


@pytest.fixture()
def small_corpus(tmp_path) -> Path:
    return write_small_corpus(tmp_path / "corpus.txt")


@pytest.fixture()
def dirs(tmp_path) -> dict[str, Path]:
    """store_root, run_dir and data_dir for one run under tmp_path."""
    return {"store_root": tmp_path / "store", "run_dir": tmp_path / "run", "data_dir": tmp_path / "data"}
