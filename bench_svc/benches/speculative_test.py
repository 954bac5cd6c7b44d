"""The speculative-decoding benchmark end to end on CPU with two briefly trained models: every mode and k gets a
row, greedy rows match the target's tokens, and the header carries the harness's provenance."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from bench_svc.benches.speculative import MODULE, _train, build_parser, main
from model.presets import get_preset
from model.tokenizers import CharTokenizer
from model.transformer import GPT

SPEECH = "FIRST CITIZEN:\nbefore we proceed any further, hear me speak.\n\n"


def test_writes_rows_for_every_mode_and_k_with_the_provenance_header(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SPEECH * 60)
    code = main(
        [
            "--corpus",
            str(corpus),
            "--target-steps",
            "2",
            "--draft-steps",
            "2",
            "--batch",
            "2",
            "--seq",
            "32",
            "--k",
            "1,2",
            "--prompts",
            "1",
            "--max-new-tokens",
            "4",
            "--repeats",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "out" / "speculative-cpu.json").read_text())
    assert {(r["mode"], r["k"]) for r in doc["rows"]} == {(m, k) for m in ("greedy", "sample") for k in (0, 1, 2)}
    assert all(r["same_tokens_as_target"] is True for r in doc["rows"] if r["mode"] == "greedy" and r["k"])
    header = doc["header"]
    assert header["device"].startswith("cpu: ") and header["git_commit"] and MODULE in header["command"]
    assert header["created"][:2] == "20" and "target alone" in header["anchor"]
    assert (tmp_path / "out" / "speculative-cpu.png").stat().st_size > 0
    assert capsys.readouterr().out.strip().splitlines()[0].startswith("series")


def test_a_distilled_draft_is_closer_to_its_teacher_than_one_trained_on_the_corpus():
    """--draft-distill: the draft's loss is the cross-entropy against the teacher's softmax, so after the same steps
    its next-token distributions sit far nearer the teacher's (KL) than a draft trained on the corpus's tokens."""
    args = build_parser().parse_args(["--batch", "4", "--seq", "32"])
    tokenizer = CharTokenizer.from_corpus(SPEECH)
    data = torch.tensor(tokenizer.encode(SPEECH * 60), dtype=torch.long)
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32, dropout=0.0, n_layer=1)
    torch.manual_seed(0)
    teacher = GPT(config).eval()  # a fresh model: near-uniform distributions, nothing like the corpus's
    drafts = []
    for t in (None, teacher):
        torch.manual_seed(1)
        draft = GPT(config)
        info = _train(draft, data, 40, 60.0, args, 2e-3, t)
        assert info["steps"] == 40 and info["train_loss"] > 0
        drafts.append(draft)
    x = data[: 4 * 32].view(4, 32)
    with torch.no_grad():
        p = F.log_softmax(teacher(x)[0], dim=-1)
        kl = [
            F.kl_div(F.log_softmax(d(x)[0], dim=-1), p, log_target=True, reduction="batchmean").item() for d in drafts
        ]
    assert kl[1] < kl[0] / 4, kl
