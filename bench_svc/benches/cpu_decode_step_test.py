"""The CPU decode-step measurements at toy sizes (figures are not checked, only that each choice and design ran)."""

from __future__ import annotations

import pytest

from bench_svc.benches.cpu_decode_step import decode_step_ms, linear_designs_us, main, profile_table
from model.presets import get_preset
from model.transformer import GPT


def _small() -> GPT:
    config = get_preset("shakespeare-char", n_layer=1, n_embd=32, n_head=2, vocab_size=20, block_size=32)
    return GPT(config.replace(dropout=0.0)).eval()


def test_every_weights_choice_and_linear_design_is_timed(one_thread):
    model = _small()
    steps = decode_step_ms(model, ("fp32", "bf16", "int8"), steps=3, rounds=2)
    assert list(steps) == ["fp32", "bf16", "int8"] and all(ms > 0 for ms in steps.values())
    designs = linear_designs_us(model, rounds=1, calls=2)
    assert list(designs) == ["fp32", "bf16", "int8 (_weight_int8pack_mm)", "int8 (torch.ao dynamic, per channel)"]
    assert all(us > 0 for us in designs.values())
    assert "aten::_weight_int8pack_mm" in profile_table(model, "int8", steps=2)


def test_int8_eager_is_timed_beside_the_compiled_int8_step(one_thread):
    model = _small()
    steps = decode_step_ms(model, ("int8",), steps=3, rounds=2, int8_eager=True)
    assert list(steps) == ["int8", "int8-eager"] and all(ms > 0 for ms in steps.values())
    table = profile_table(model, "int8-eager", steps=2)
    assert "aten::_weight_int8pack_mm" in table and "CompiledFxGraph" not in table  # the eager step's ops


def test_a_bad_profile_choice_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--weights", "fp32", "--profile", "int4"])
    assert exit_.value.code == 2
    assert "--profile must be of ['fp32', 'bf16', 'int8', 'int8-eager'], got 'int4'" in capsys.readouterr().err


def test_a_bad_weights_choice_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--weights", "fp32,int4"])
    assert exit_.value.code == 2
    assert "weights must be of ['fp32', 'bf16', 'int8'], got 'int4'" in capsys.readouterr().err
