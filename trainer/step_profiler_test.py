"""`tinylm train --profile N` writes a Chrome/TensorBoard trace of N steps and says where it went."""

import json

import pytest

from trainer.main import main
from trainer.testing import write_small_corpus

FAST = ["device=cpu", "max_steps=4", "batch_size=4", "block_size=32", "eval_interval=4", "eval_iters=1",
        "warmup=1", "tensorboard=false"]  # fmt: skip


def test_profile_writes_a_trace_of_n_steps(tmp_path, capsys):
    env = {"TINYLM_HOME": str(tmp_path / "home"), "TINYLM_CORPUS": str(write_small_corpus(tmp_path / "c.txt"))}
    run_dir = tmp_path / "run"
    assert main(["--preset", "tiny", "--no-progress", "--profile", "2", *FAST, f"log_dir={run_dir}"], env) == 0
    err = capsys.readouterr().err
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    assert f"profiler trace (2 steps): {trace}" in err
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert len(events) > 100 and {"forward", "backward", "optimizer"} <= names
    steps = sorted(e["name"] for e in events if str(e.get("name")).startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # steps 0 (skipped) and 1 (warm-up) are not in it
    assert "aten::mm" in (run_dir / "profile" / "rank0.summary.txt").read_text()


def test_profile_needs_a_positive_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--profile", "0", *FAST], {"TINYLM_HOME": str(tmp_path)})
    assert exit_.value.code == 2
    assert "must be an integer >= 1" in capsys.readouterr().err
