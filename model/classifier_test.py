"""Sequence classifier: the GPT's own hidden states, padding-aware pooling, fine-tuning modes, the speaker task."""

from __future__ import annotations

import json
import os

import pytest
import torch

from model.classifier import SequenceClassifier, final_hidden_states, pad_batch
from model.classifier_main import main
from model.classifier_train import FitConfig, fit
from model.config import ModelConfig
from model.lora import LoRALinear
from model.speaker_data import parse_speeches, speaker_task
from model.testing import llama_test_config
from model.transformer import GPT

CONFIGS = {
    "llama": llama_test_config(vocab_size=30, block_size=24),
    "gpt2": ModelConfig(vocab_size=30, n_layer=2, n_head=2, n_embd=16, block_size=24),
}

PLAY = """ALICE:
Good morrow, cousin.
How fares the day?

BOB:
Well, well enough.

ALICE:
Then let us walk.

CAROL:
Stay, I pray you.
Stay a while.

ALICE:
No, we must go.

BOB:
Farewell then.

stage direction without a speaker
"""


def _gpt(name: str) -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIGS[name]).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_states_are_the_lm_s_own(name):
    gpt = _gpt(name)
    idx = torch.randint(0, 30, (3, 10))
    with torch.no_grad():
        torch.testing.assert_close(gpt.lm_head(final_hidden_states(gpt, idx)), gpt(idx)[0])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_does_not_change_a_row(name, pooling):
    clf = SequenceClassifier(_gpt(name), 3, pooling=pooling).eval()
    short, long = [4, 8, 15, 16], [23, 4, 2, 9, 9, 1, 7, 3]
    ids, mask = pad_batch([short, long], max_len=20)
    assert ids.shape == (2, 8) and mask.sum(1).tolist() == [4, 8]
    with torch.no_grad():
        batched = clf(ids, mask)
        torch.testing.assert_close(batched[0], clf(torch.tensor([short]))[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1], clf(torch.tensor([long]))[0], atol=1e-5, rtol=1e-5)
        hidden = final_hidden_states(clf.gpt, torch.tensor([short]))[0]  # (T, C)
        want = hidden.mean(0) if pooling == "mean" else hidden[-1]
        torch.testing.assert_close(clf.pool(final_hidden_states(clf.gpt, ids), mask)[0], want, atol=1e-5, rtol=1e-5)


def test_pad_batch_cuts_and_rejects_empty():
    ids, mask = pad_batch([[1, 2, 3, 4, 5], [6]], max_len=3, pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [6, 9, 9]] and mask.tolist() == [[True] * 3, [True, False, False]]
    with pytest.raises(ValueError, match="at least 1 token"):
        pad_batch([[1], []], max_len=4)


def _toy_examples(n: int = 64) -> list[tuple[list[int], int]]:
    """Label 1 iff token 7 occurs: learnable in a few steps."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        seq = torch.randint(8, 30, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
        if i % 2:
            seq[int(torch.randint(len(seq), (1,), generator=gen))] = 7
        out.append((seq, i % 2))
    return out


@pytest.mark.parametrize("finetune", ["full", "lora", "head"])
def test_finetune_modes_train_what_they_should(finetune):
    clf = SequenceClassifier(_gpt("llama"), 2)
    frozen_before = {n: p.detach().clone() for n, p in clf.gpt.named_parameters()}
    head_before = clf.head.weight.detach().clone()
    losses = fit(
        clf, _toy_examples(), FitConfig(steps=30, batch_size=16, lr=3e-3, max_len=16, finetune=finetune, lora_rank=2)
    )
    assert losses[-1] < losses[0]
    assert not torch.equal(clf.head.weight, head_before)
    changed = {n for n, p in clf.gpt.named_parameters() if n in frozen_before and not torch.equal(p, frozen_before[n])}
    has_lora = any(isinstance(m, LoRALinear) for m in clf.gpt.modules())
    assert has_lora == (finetune == "lora")
    if finetune == "full":
        assert "blocks.0.attn.q_proj.weight" in changed
    else:
        assert not changed  # LoRA trains only its adapters (new parameters); "head" trains the head alone
    if finetune == "lora":
        assert any(not torch.all(m.lora_B == 0) for m in clf.gpt.modules() if isinstance(m, LoRALinear))


def test_fit_config_validation():
    with pytest.raises(ValueError, match="finetune must be one of"):
        FitConfig(finetune="partial")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        FitConfig(steps=0)


def test_speaker_task_splits_by_speech():
    speeches = parse_speeches(PLAY)
    assert [s.speaker for s in speeches] == ["ALICE", "BOB", "ALICE", "CAROL", "ALICE", "BOB"]
    task = speaker_task(PLAY, 2, held_out_fraction=0.4, seed=3)
    assert task.classes == ("ALICE", "BOB")  # most speeches first
    train_lines = {t for t, _ in task.train}
    held_lines = {t for t, _ in task.held_out}
    assert not train_lines & held_lines and "Stay a while." not in train_lines | held_lines  # CAROL is not a class
    assert len(task.train) + len(task.held_out) == 6  # ALICE's 4 lines + BOB's 2
    speech = speaker_task(PLAY, 2, held_out_fraction=0.4, seed=3, unit="speech")
    assert ("Good morrow, cousin.\nHow fares the day?", 0) in speech.train + speech.held_out
    assert 0.0 <= task.majority_accuracy() <= 1.0
    with pytest.raises(ValueError, match="n_speakers must be at most the 3 speakers"):
        speaker_task(PLAY, 4)
    with pytest.raises(ValueError, match="unit must be one of"):
        speaker_task(PLAY, 2, unit="word")


def test_main_reports_accuracy_and_baseline(tmp_path, capsys):
    corpus = tmp_path / "play.txt"
    corpus.write_text(PLAY * 5)
    argv = ["--corpus", str(corpus), "--steps", "3", "--batch-size", "4", "--json", "--max-len", "16"]
    assert main(argv + ["--preset", "tiny"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == ["ALICE", "BOB"] and 0.0 <= report["held_out_accuracy"] <= 1.0
    assert report["majority_accuracy"] > 0
    assert main(["--corpus", str(tmp_path / "missing.txt")]) == 2


@pytest.mark.skipif(not os.environ.get("TINYLM_CORPUS"), reason="TINYLM_CORPUS is not set (the Tiny Shakespeare path)")
def test_beats_the_majority_class_on_held_out_lines(capsys):
    # Two speakers, one line per example, a 2-layer 64-wide model from scratch: ~15 s on one thread.
    argv = [
        "--corpus",
        os.environ["TINYLM_CORPUS"],
        "--speakers",
        "2",
        "--unit",
        "line",
        "--n-layer",
        "2",
        "--n-embd",
        "64",
        "--steps",
        "200",
        "--max-len",
        "48",
        "--threads",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["held_out_examples"] > 200
    assert report["held_out_accuracy"] > report["majority_accuracy"] + 0.05, report
