"""The CLI dispatches verbs, refuses unknown ones with the list, and says plainly when a verb is not built."""

import sys
import types

import pytest

from tools import cli


def test_unknown_verb_names_the_allowed_ones(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "frobnicate" in err and "train" in err and "serve" in err


def test_help_lists_every_verb(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.VERBS:
        assert name in out


def test_missing_module_is_reported_as_not_built(monkeypatch, capsys):
    monkeypatch.setitem(cli.VERBS, "ghost", cli.Verb("tinylm_no_such_package.main", "nothing", 99))
    assert cli.main(["ghost"]) == cli.EXIT_NOT_BUILT
    assert "not built yet (issue #99" in capsys.readouterr().err


def test_dispatch_passes_arguments_and_exit_code(monkeypatch):
    seen = []
    fake = types.ModuleType("tinylm_fake_verb")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "tinylm_fake_verb", fake)
    monkeypatch.setitem(cli.VERBS, "fake", cli.Verb("tinylm_fake_verb", "fake", 0))
    assert cli.main(["fake", "--x", "1"]) == 7
    assert seen == [["--x", "1"]]


def test_a_broken_import_inside_a_verb_is_not_hidden(monkeypatch):
    broken = types.ModuleType("tinylm_broken_verb")
    monkeypatch.setitem(cli.VERBS, "broken", cli.Verb("tinylm_broken_verb.main", "broken", 0))
    monkeypatch.setitem(sys.modules, "tinylm_broken_verb", broken)

    def fail(name, *a, **k):
        raise ModuleNotFoundError("No module named 'numpy_missing_dep'", name="numpy_missing_dep")

    monkeypatch.setattr(cli.importlib, "import_module", fail)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["broken"])
