"""The engine's speculative benchmark end to end on CPU, on two small saved models (no training, no corpus)."""

from __future__ import annotations

import json

import pytest
import torch

from bench_svc.benches.speculative_engine import main
from model.artifact import save_artifact
from model.presets import get_preset
from model.transformer import GPT


@pytest.mark.parametrize("rounds", ["loop", "draft", "loop,draft+verify+accept+finish,kplus1"])
def test_writes_rows_for_every_concurrency_mode_and_k(tiny, tmp_path, capsys, rounds):
    """Also with --rounds naming kernels (their engines take the options; on CPU the kernels' references run): the
    same rows for each design, written to a file of their own; several designs: each one's rows in one run."""
    torch.manual_seed(3)
    draft = GPT(get_preset("tiny", vocab_size=tiny.tokenizer.vocab_size, n_layer=1, n_embd=64))
    draft_id = save_artifact(tmp_path / "store", draft, tiny.tokenizer, name="draft", preset="tiny")
    code = main(
        ["--rounds", rounds]
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
    name = (
        "speculative-engine-cpu"
        + {
            "loop": "",
            "draft": "-draft",
            "loop,draft+verify+accept+finish,kplus1": "-loop-draft_verify_accept_finish-kplus1",
        }[rounds]
    )
    doc = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    designs = rounds.split(",")
    assert doc["summary"]["rounds"] == designs
    rows = doc["rows"]
    assert sorted((r["concurrency"], r["mode"], r["k"], r["rounds"]) for r in rows) == sorted(
        [(c, m, 0, "loop") for c in (1, 2) for m in ("greedy", "sample")]
        + [(c, m, k, d) for c in (1, 2) for m in ("greedy", "sample") for k in (1, 3) for d in designs]
    )
    assert all(r["tokens"] == 6 * r["concurrency"] for r in rows)
    assert all(r["ms_per_token"] > 0 for r in rows)
    # the loop's split: a plain step gives each row 1 token an iteration at most; a round 1 .. k + 1
    assert all(0 < r["tokens_per_iteration"] <= r["concurrency"] * (r["k"] + 1) for r in rows)
    assert all(r["launch_us"] > 0 and r["wait_us"] >= 0 and r["stream_us"] > 0 for r in rows)
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


def test_a_bad_round_design_is_named(tmp_path, capsys):
    assert main(["--rounds", "draft+fast", "--corpus", "", "--target-artifact", "x", "--draft-artifact", "y"]) == 2
    assert "'draft+fast' is not 'loop' or a '+'-joined set of draft, verify, accept" in capsys.readouterr().err
