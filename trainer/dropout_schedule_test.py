"""Dropout annealing: the schedule's values, the p every dropout sees during training, and exact resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, load_config, parse_overrides
from trainer.dropout_schedule import COMPILED_LEVELS, dropout_at, dropout_levels
from trainer.run_log import read_log
from trainer.testing import fast_config
from trainer.train import train


def test_linear_and_cosine_values():
    linear = fast_config(dropout_start=0.4, dropout_end=0.0, dropout_anneal_steps=8)
    assert [dropout_at(s, linear) for s in (0, 2, 4, 8, 11)] == pytest.approx([0.4, 0.3, 0.2, 0.0, 0.0])
    cosine = linear.replace(dropout_anneal="cosine")
    assert dropout_at(0, cosine) == pytest.approx(0.4) and dropout_at(4, cosine) == pytest.approx(0.2)
    assert dropout_at(2, cosine) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert dropout_at(8, cosine) == pytest.approx(0.0) and dropout_at(100, cosine) == pytest.approx(0.0)
    rising = linear.replace(dropout_start=0.0, dropout_end=0.3, dropout_anneal_steps=0)  # 0: over max_steps (12)
    assert dropout_at(6, rising) == pytest.approx(0.15) and dropout_at(12, rising) == pytest.approx(0.3)


def test_levels_snap_to_equally_spaced_values():
    cfg = fast_config(dropout_start=0.4, dropout_end=0.0, dropout_anneal_steps=100, dropout_anneal_levels=5)
    values = [dropout_at(s, cfg) for s in range(101)]
    assert sorted(set(values), reverse=True) == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    assert values[0] == pytest.approx(0.4) and values[-1] == 0.0
    assert values[12] == pytest.approx(0.4) and values[13] == pytest.approx(0.3)  # 0.4 - 0.4 * 13/100 is nearer 0.3
    assert dropout_levels(fast_config(dropout_start=0.2)) == 0  # eager: every step its own p
    assert dropout_levels(fast_config(dropout_start=0.2, compile_mode="default")) == COMPILED_LEVELS


def test_annealing_options_are_validated():
    cfg = load_config("tiny", overrides=parse_overrides(
        ["dropout_start=0.3", "dropout_end=0.05", "dropout_anneal_steps=50", "dropout_anneal=cosine"]
    ))  # fmt: skip
    assert (cfg.dropout_start, cfg.dropout_end) == (0.3, 0.05)
    assert (cfg.dropout_anneal_steps, cfg.dropout_anneal) == (50, "cosine")
    assert cfg.anneals_dropout and not load_config("tiny", overrides={"dropout_start": "none"}).anneals_dropout
    for item, key, words in [
        ("dropout_start=1.5", "dropout_start", "[0.0, 0.99]"),
        ("dropout_end=-0.1", "dropout_end", "[0.0, 0.99]"),
        ("dropout_anneal=step", "dropout_anneal", "['linear', 'cosine']"),
        ("dropout_anneal_steps=-1", "dropout_anneal_steps", "[0, "),
        ("dropout_anneal_levels=1", "dropout_anneal_levels", "[2, 1000]"),
    ]:
        with pytest.raises(ConfigError, match=key) as info:
            load_config("tiny", overrides=parse_overrides([item]))
        assert info.value.key == key and words in str(info.value)


def test_every_dropout_sees_the_scheduled_p_at_each_step(small_corpus, dirs, monkeypatch):
    seen: list[list[float]] = [[]]  # p values of the dropout calls of each step
    real_dropout, real_sdpa = F.dropout, F.scaled_dot_product_attention

    def spy_dropout(x, p=0.5, training=True, inplace=False):
        if training:
            seen[-1].append(("dropout", p))
        return real_dropout(x, p, training, inplace)

    def spy_sdpa(*args, dropout_p=0.0, **kwargs):
        if torch.is_grad_enabled():  # training forward (evaluation runs under no_grad)
            seen[-1].append(("attention", dropout_p))
        return real_sdpa(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(F, "dropout", spy_dropout)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    logged = {}

    def on_progress(step, metrics):
        if "val_loss" not in metrics:
            logged[step] = metrics["dropout"]
            seen.append([])

    cfg = fast_config(max_steps=6, eval_interval=6, dropout_start=0.5, dropout_end=0.1, dropout_anneal_steps=4)
    train(cfg, small_corpus, progress_callback=on_progress, **dirs)
    expected = [0.5, 0.4, 0.3, 0.2, 0.1, 0.1]
    assert [logged[s] for s in range(1, 7)] == pytest.approx(expected)
    n_layer = 4  # tiny: embedding dropout + per layer residual, MLP and attention-weight dropout
    for step, p in enumerate(expected):
        calls = seen[step]
        assert len(calls) == 1 + 3 * n_layer, calls
        assert all(value == pytest.approx(p) for _, value in calls), (step, calls)
    rows = [r for r in read_log(dirs["run_dir"] / "log.csv") if r["kind"] == "train"]
    assert [float(r["dropout"]) for r in rows] == pytest.approx(expected)


def test_resume_is_exact_with_annealed_dropout(small_corpus, tmp_path):
    cfg = fast_config(dropout_start=0.3, dropout_end=0.0, dropout_anneal_steps=10, resume=True)
    common = dict(store_root=tmp_path / "s", data_dir=tmp_path / "d")
    full = train(cfg, small_corpus, run_dir=tmp_path / "a", **common)
    calls = []
    first = train(cfg, small_corpus, run_dir=tmp_path / "b", should_stop=lambda: calls.append(1) or len(calls) > 5,
                  **common)  # fmt: skip
    assert first.stopped == "cancelled" and first.steps == 5
    second = train(cfg, small_corpus, run_dir=tmp_path / "b", **common)
    assert first.losses + second.losses == full.losses  # bit for bit
    assert second.model_id == full.model_id
