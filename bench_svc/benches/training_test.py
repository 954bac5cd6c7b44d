"""The training benchmark refuses a CPU-only machine, and its --cpu-smoke mode runs the whole path end to end."""

import csv
import json
import time

import pytest
import torch

from bench_svc.benches import training
from trainer.testing import write_small_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # as the trainer's own tests run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(capsys, tmp_path):
    assert training.main(["--out", str(tmp_path)]) == training.NO_GPU_EXIT_CODE
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cpu_smoke_writes_csv_json_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_CORPUS", str(write_small_corpus(tmp_path / "c.txt")))
    out = tmp_path / "results"
    code = training.main(["--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path / "w"), "--max-steps", "20",
                       "--target", "2.0"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader((out / "train-cpu.csv").open()))
    assert [r["variant"] for r in rows] == ["tinylm", "tinylm-fast", "tinylm-muon", "eager-pytorch"]
    assert all(r["gpu"] == "cpu" and r["command"].endswith("--target 2.0") and r["commit"] for r in rows)
    doc = json.loads((out / "train-cpu.json").read_text())
    for result in doc["results"]:
        assert result["curve"] and result["tokens_per_s"] > 0 and result["mfu"] is None
        vals = [c["val_loss"] for c in result["curve"]]
        assert result["best_val_loss"] == min(vals)
        if result["reached_target"]:
            assert vals[-1] <= 2.0 and result["time_to_target_s"] == result["curve"][-1]["t"]
        else:
            assert min(vals) > 2.0
        assert result["best_val_loss_full"] > 0  # the best weights scored on the whole val split
    tinylm, fast, muon, anchor = doc["results"]
    assert tinylm["compile"] and not anchor["compile"] and anchor["steps"] == tinylm["steps"] == 20
    # Compiled (fp32 on the CPU) and eager train the same model alike; the anchor comparison says by how much.
    assert 0 <= tinylm["max_eval_diff_vs_anchor"] < 1e-3
    assert abs(tinylm["curve"][0]["val_loss"] - anchor["curve"][0]["val_loss"]) < 1e-3
    assert fast["steps"] == 10 and fast["curve"][0]["val_loss"] != anchor["curve"][0]["val_loss"]  # another lr
    assert muon["steps"] == 20 and muon["best_val_loss"] < muon["curve"][0]["val_loss"] - 0.2  # trains (2.2 -> 1.7)
    assert muon["curve"][0]["val_loss"] != anchor["curve"][0]["val_loss"] and muon["max_eval_diff_vs_anchor"] is None
    assert (out / "train-cpu.png").stat().st_size > 1000
    assert "tinylm" in capsys.readouterr().out


def test_variants_picks_and_orders_and_names_the_choices(capsys):
    args = training._parse_args(["--cpu-smoke", "--variants", "eager-pytorch,tinylm"])
    assert [name for name, _ in training._variants(args)] == ["eager-pytorch", "tinylm"]
    args = training._parse_args(["--variants", "eager-pytorch"])
    ((name, config),) = training._variants(args)
    assert name == "eager-pytorch" and config.kernels is False and config.compile_mode == "none"
    with pytest.raises(
        SystemExit,
        match=r"unknown variant 'fast'; choose from \['tinylm', 'tinylm-nokernels', 'tinylm-kernels', "
        r"'tinylm-flash', 'tinylm-ro', 'tinylm-graph', 'tinylm-fast', 'tinylm-fast-graph', 'tinylm-muon', "
        r"'tinylm-muon-hot', 'tinylm-muon-long', 'tinylm-muon-short', 'tinylm-muon-gpt', 'tinylm-muon-fast', "
        r"'tinylm-muon-fast-ro', 'tinylm-muon-fast-ema', 'tinylm-muon-fast-ema995', 'tinylm-muon-fast-1100', "
        r"'tinylm-muon-ema-long', 'tinylm-muon-60s', 'tinylm-tuned', 'tinylm-opt', "
        r"'tinylm-blocks', 'tinylm-opt-blocks', "
        r"'tinylm-muon-blocks', 'compile-default', 'eager', 'eager-pytorch'\]",
    ):
        training._variants(training._parse_args(["--variants", "fast"]))


def test_compile_option_variants_change_only_their_option():
    """The default step (one CUDA graph around the compiled model, the fused add + norm) against the same without our
    kernels, with all of them, and reduce-overhead's way, which the compile options modify."""
    variants = dict(training._all_variants(training._parse_args([])))
    base, muon = variants["tinylm"], variants["tinylm-muon"]
    assert (base.compile_mode, base.step_graph, base.kernel_names) == ("default", "auto", "add_norm")
    plain = variants["tinylm-nokernels"]
    assert plain == base.replace(kernel_names="") and variants["tinylm-kernels"] == plain.replace(kernels=True)
    ro = variants["tinylm-ro"]
    assert ro == plain.replace(compile_mode="reduce-overhead", step_graph=False)
    assert variants["tinylm-opt"] == ro.replace(compile_optimizer=True)
    assert variants["tinylm-blocks"] == ro.replace(compile_scope="blocks")
    assert variants["tinylm-opt-blocks"] == ro.replace(compile_optimizer=True, compile_scope="blocks")
    assert variants["tinylm-muon-blocks"] == muon.replace(compile_scope="blocks")
    anchor = variants["eager-pytorch"]
    assert (anchor.compile_mode, anchor.step_graph, anchor.kernel_names, anchor.kernels) == ("none", False, "", False)
    fast, fast_ro = variants["tinylm-muon-fast"], variants["tinylm-muon-fast-ro"]
    assert fast_ro == fast.replace(compile_mode="reduce-overhead", step_graph=False, kernel_names="")
    assert fast.eval_mode == "val-full" and muon.eval_mode == base.eval_mode == "sampled"
    assert variants["tinylm-muon-fast-ema"] == fast.replace(ema_decay=0.99) and fast.ema_decay == 0.0


def test_startup_entries_name_a_variant_and_a_cache_state():
    names = dict(training._all_variants(training._parse_args([])))
    runs = training.startup_runs(
        "cold,warm, graph,tinylm-muon-blocks:cold,tinylm-muon-blocks:warm,tinylm:worker,tinylm-muon-fast:run,"
        "tinylm-muon-fast+dropout=0.3:run",
        names,
    )
    assert runs == [
        ("startup-cold", "tinylm", "cold"),
        ("startup-warm", "tinylm", "warm"),
        ("startup-graph", "tinylm-graph", "warm"),
        ("startup-tinylm-muon-blocks-cold", "tinylm-muon-blocks", "cold"),
        ("startup-tinylm-muon-blocks-warm", "tinylm-muon-blocks", "warm"),
        ("startup-tinylm-worker", "tinylm", "worker"),
        ("startup-tinylm-muon-fast-run", "tinylm-muon-fast", "run"),
        ("startup-tinylm-muon-fast+dropout=0.3-run", "tinylm-muon-fast+dropout=0.3", "run"),
    ]
    for bad in ("tinylm-blocks:hot", "lukewarm"):
        with pytest.raises(SystemExit, match=r"bad --startup entry .*KIND one of \['cold', 'warm', 'worker', 'run'\]"):
            training.startup_runs(bad, names)
    with pytest.raises(SystemExit, match=r"unknown variant 'nope'; choose from \[.*'tinylm-muon-fast'"):
        training.startup_runs("nope:cold", names)
    with pytest.raises(SystemExit, match=r"variant 'tinylm\+dropuot=0.3'.*unknown config key 'dropuot'.*'dropout'"):
        training.startup_runs("tinylm+dropuot=0.3:run", names)


def test_a_variant_name_can_change_config_keys():
    """`VARIANT+key=value+...`: the named variant with those keys coerced and validated as on the command line."""
    variants = dict(training._all_variants(training._parse_args([])))
    fast = variants["tinylm-muon-fast"]
    args = training._parse_args(["--variants", "tinylm-muon-fast+dropout=0.3+max_steps=2e3+ema_decay=0.995,eager"])
    (name, changed), (_, eager) = training._variants(args)
    assert name == "tinylm-muon-fast+dropout=0.3+max_steps=2e3+ema_decay=0.995"
    assert changed == fast.replace(dropout=0.3, max_steps=2000, ema_decay=0.995) and eager == variants["eager"]
    with pytest.raises(SystemExit, match=r"variant 'tinylm\+dropout=2'.*dropout"):
        training._variants(training._parse_args(["--variants", "tinylm+dropout=2"]))
    with pytest.raises(SystemExit, match=r"variant 'tinylm\+lr'.*must look like key=value"):
        training._variants(training._parse_args(["--variants", "tinylm+lr"]))


def test_every_variant_cuts_to_a_two_step_startup_run():
    """The startup worker trains two steps of any variant; a trapezoid schedule keeps its length (its warmdown
    must fit), and nothing that picks the compiled graphs changes."""
    for name, config in training._all_variants(training._parse_args([])):
        short = training.startup_config(config)
        assert short.max_steps == 2 and short.log_interval == 1, name
        same = ("compile_mode", "compile_scope", "compile_optimizer", "optimizer", "preset", "dtype", "step_graph")
        assert all(getattr(short, key) == getattr(config, key) for key in same), name


def test_a_worker_start_up_run_times_each_job_with_the_trainers_own_metrics(tmp_path, monkeypatch):
    """--startup VARIANT:worker: two jobs back to back in one process, each with its first step's time and the
    trainer's start-up metrics (TrainResult.startup), and whether the process kept the first job's compiled code."""
    monkeypatch.setenv("TINYLM_CORPUS", str(write_small_corpus(tmp_path / "c.txt")))
    monkeypatch.setenv("TINYLM_BENCH_LAUNCH", repr(time.time() - 5.0))
    out = tmp_path / "jobs.json"
    code = training.main(["--cpu-smoke", "--startup-worker", str(out), "--startup-variant", "eager-pytorch",
                          "--startup-jobs", "2", "--workdir", str(tmp_path / "w")])  # fmt: skip
    doc = json.loads(out.read_text())
    assert code == 0 and len(doc["jobs"]) == 2 and doc["first_step_s"] == doc["jobs"][0]["since_launch_s"] >= 5.0
    for job in doc["jobs"]:
        assert job["reused"] is False  # eager: nothing compiled to keep
        assert job["startup_s"] >= job["setup_s"] > 0 and job["first_step_s"] > 0


def test_a_run_in_a_new_process_counts_its_times_from_the_launch(tmp_path, monkeypatch):
    """--startup VARIANT:run: the worker trains the variant whole and times everything from the parent's launch
    (TINYLM_BENCH_LAUNCH), so the interpreter's start and imports count toward the time to the target."""
    monkeypatch.setenv("TINYLM_CORPUS", str(write_small_corpus(tmp_path / "c.txt")))
    monkeypatch.setenv("TINYLM_BENCH_LAUNCH", repr(time.time() - 5.0))  # as if launched 5 s ago
    out = tmp_path / "run.json"
    code = training.main(["--cpu-smoke", "--startup-worker", str(out), "--startup-variant", "eager-pytorch",
                          "--startup-run", "--workdir", str(tmp_path / "w"), "--max-steps", "10", "--budget-s", "60",
                          "--target", "9.0"])  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["variant"] == "eager-pytorch" and doc["steps"] == 10 and doc["reached_target"]
    assert 5.0 <= doc["first_step_s"] <= doc["time_to_target_s"] == doc["curve"][0]["t"] <= doc["wall_s"]
    assert doc["best_val_loss_full"] > 0
    # launched again under the same name and cut before its first evaluation: no figure from the weights before
    code = training.main(["--cpu-smoke", "--startup-worker", str(out), "--startup-variant", "eager-pytorch",
                          "--startup-run", "--workdir", str(tmp_path / "w"), "--max-steps", "10", "--budget-s", "0",
                          "--target", "9.0"])  # fmt: skip
    again = json.loads(out.read_text())
    assert code == 0 and again["curve"] == [] and again["best_val_loss_full"] is None
