"""The CI script's usage errors (its full run is what the `trained` and `exported` fixtures do)."""

from __future__ import annotations

import pytest

from tools.ci_artifacts import main


def test_missing_corpus_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "out"), "--corpus", str(tmp_path / "missing.txt")])
    assert exit_.value.code == 2 and "--corpus" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
