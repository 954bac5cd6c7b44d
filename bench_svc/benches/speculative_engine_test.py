"""The engine's speculative benchmark end to end on CPU, on two small saved models (no training, no corpus)."""

from __future__ import annotations

import json

import pytest
import torch

from bench_svc.benches.speculative_engine import main
from model.artifact import save_artifact
from model.presets import get_preset
from model.transformer import GPT


@pytest.mark.parametrize("draft_kernel", ["off", "on", "both"])
def test_writes_rows_for_every_concurrency_mode_and_k(tiny, tmp_path, capsys, draft_kernel):
    """Also with --draft-kernel (its engines take the option; on CPU the kernel's reference runs the steps): the same
    rows, written to a file of their own; `both`: the loop's and the kernel's speculative rows in one run."""
    torch.manual_seed(3)
    draft = GPT(get_preset("tiny", vocab_size=tiny.tokenizer.vocab_size, n_layer=1, n_embd=64))
    draft_id = save_artifact(tmp_path / "store", draft, tiny.tokenizer, name="draft", preset="tiny")
    code = main(
        {"off": [], "on": ["--draft-kernel"], "both": ["--draft-kernel", "both"]}[draft_kernel]
        + [
            "--target-artifact",
            str(tiny.path),
            "--draft-artifact",
            str(tmp_path / "store" / draft_id),
            "--corpus",
            "",  # CI sets TINYLM_CORPUS, whose characters these models' tokenizer lacks
            "--k",
            "1,3",
            "--concurrency",
            "1,2",
            "--max-new-tokens",
            "6",
            "--repeats",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    name = "speculative-engine-cpu" + {"off": "", "on": "-draft-kernel", "both": "-draft-kernel-both"}[draft_kernel]
    doc = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert doc["summary"]["draft_kernel"] == draft_kernel
    rows = doc["rows"]
    kernels = {"off": [False], "on": [True], "both": [False, True]}[draft_kernel]
    assert sorted((r["concurrency"], r["mode"], r["k"], r["draft_kernel"]) for r in rows) == sorted(
        [(c, m, 0, False) for c in (1, 2) for m in ("greedy", "sample")]
        + [(c, m, k, kern) for c in (1, 2) for m in ("greedy", "sample") for k in (1, 3) for kern in kernels]
    )
    assert all(r["tokens"] == 6 * r["concurrency"] for r in rows)
    assert all(r["ms_per_token"] > 0 for r in rows)
    assert all(r["same_tokens_as_target"] is True for r in rows if r["mode"] == "greedy" and r["k"])
    assert all(0.0 <= r["acceptance_rate"] <= 1.0 for r in rows if r["k"])
    assert "the engine without a draft" in doc["header"]["anchor"]
    assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0
    assert capsys.readouterr().out.strip().splitlines()[0].startswith("series")


def test_a_corpus_the_tokenizer_cannot_encode_is_refused(tiny, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["QUEEN:\n" + "Q" * 40] * 20))
    code = main(
        [
            "--target-artifact",
            str(tiny.path),
            "--draft-artifact",
            str(tiny.path),
            "--corpus",
            str(corpus),
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "prompts from --corpus" in capsys.readouterr().err and not (tmp_path / "out").exists()
