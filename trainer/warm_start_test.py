"""The compiler's background import changes nothing a run computes, and a worker's second job of the same config
reuses the first's compiled code and trains exactly as the first did. Timings are recorded, never asserted on."""

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from trainer.testing import fast_config
from trainer.warm_start import COMPILER_MODULES, CompiledReuse, CompilerPreload, compile_key

REPO = Path(__file__).resolve().parents[1]

# A fresh process: the preload's imports alone, checking that they leave every RNG as it was; or a run with or without
# the preload: with it, the imports run while the run reads the corpus and builds
# (and initialises) the model, and the run waits for them before its optimizer. Were any of them to draw from torch's
# RNG, or change a default dtype or flag, the weights, dropout masks and so the losses would differ.
_RUN = """
import json, sys
import torch
from pathlib import Path
from trainer.testing import fast_config
from trainer.train import train
from trainer import warm_start

torch.set_num_threads(1)
out = {"loaded_before": [m for m in warm_start.COMPILER_MODULES if m in sys.modules]}
if sys.argv[1] == "rng":  # the imports alone, to their end: every RNG as it was
    import random
    import numpy as np

    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    warm_start.preload_compiler().wait()
    out["rng_untouched"] = bool(torch.equal(before[0], torch.get_rng_state())
                                and (before[1] == np.random.get_state()[1]).all() and before[2] == random.getstate())
    out["loaded_after"] = [m for m in warm_start.COMPILER_MODULES if m in sys.modules]
    print(json.dumps(out))
    sys.exit(0)
if sys.argv[1] == "preload":
    preload = warm_start.preload_compiler()
    out["same_preload"] = warm_start.preload_compiler() is preload is warm_start.started_preload()
work = Path(sys.argv[3])
result = train(fast_config(dropout=0.1), Path(sys.argv[2]), store_root=work / "s", run_dir=work / sys.argv[1],
               data_dir=work / "d")
out["loaded_after"] = [m for m in warm_start.COMPILER_MODULES if m in sys.modules]
out.update(losses=result.losses, grad_norms=result.grad_norms, metrics=result.metrics)
print(json.dumps(out))
"""


def _run_in_fresh_process(mode: str, corpus: Path, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _RUN, mode, str(corpus), str(work)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_background_import_loads_the_compiler_and_changes_no_number(small_corpus, tmp_path):
    alone = _run_in_fresh_process("rng", small_corpus, tmp_path)
    assert alone["rng_untouched"] and alone["loaded_after"] == list(COMPILER_MODULES)
    with_preload = _run_in_fresh_process("preload", small_corpus, tmp_path)
    without = _run_in_fresh_process("plain", small_corpus, tmp_path)
    assert with_preload["loaded_before"] == [] == without["loaded_before"]  # `import trainer.train` stays light
    assert with_preload["loaded_after"] == list(COMPILER_MODULES)
    assert with_preload["same_preload"]
    assert with_preload["losses"] == without["losses"] and with_preload["grad_norms"] == without["grad_norms"]
    assert {"setup_s", "compiler_wait_s", "startup_s", "compiler_import_s"} <= set(with_preload["metrics"])
    assert "compiler_wait_s" not in without["metrics"] and "startup_s" in without["metrics"]


def test_a_module_that_fails_to_import_is_reported_not_raised():
    preload = CompilerPreload(("trainer.no_such_module", "json"))
    preload.wait()
    assert preload.done and preload.import_s is not None
    assert (
        list(preload.failed) == ["trainer.no_such_module"]
        and "ModuleNotFoundError" in preload.failed["trainer.no_such_module"]
    )


def test_compile_key_ignores_the_schedule_and_keeps_the_shape():
    base = fast_config(compile_mode="default")
    assert compile_key(base) == compile_key(base.replace(max_steps=40, lr=3e-3, seed=7, eval_interval=10, name="x"))
    bookkeeping = dict(eval_mode="val-full", checkpoint_interval=8, ema_decay=0.9)  # outside the compiled step
    assert compile_key(base) == compile_key(base.replace(**bookkeeping))
    for change in ({"block_size": 16}, {"batch_size": 8}, {"dropout": 0.2}, {"compile_mode": "reduce-overhead"},
                   {"dtype": "bfloat16"}, {"kernels": True}, {"step_graph": "auto"}):  # fmt: skip
        assert compile_key(base) != compile_key(base.replace(**change)), change


def test_compiled_reuse_resets_dynamo_only_when_the_shape_changes(monkeypatch):
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    reuse, compiled = CompiledReuse(), fast_config(compile_mode="default")
    assert not reuse.before_run(compiled) and resets == []  # the first run: nothing to keep, nothing to drop
    assert reuse.before_run(compiled.replace(max_steps=30, seed=3)) and resets == []
    assert not reuse.before_run(compiled.replace(block_size=16)) and resets == [1]
    assert not reuse.before_run(fast_config()) and resets == [1, 1]  # eager: the compiled state goes
    assert not reuse.before_run(fast_config()) and resets == [1, 1]  # nothing compiled since: nothing to drop


def _job(handle, i: int, corpus: Path, **overrides: str) -> tuple[dict, list[dict]]:
    """One train job through the worker's handler; its result and the metrics of its progress events."""
    from jobs.context import JobContext
    from protos import jobs_pb2

    spec = jobs_pb2.TrainSpec(preset="tiny", corpus_path=str(corpus), max_steps=6, batch_size=4, eval_interval=3,
                              device="cpu", seed=5)  # fmt: skip
    spec.overrides.update({"block_size": "32", "eval_iters": "2", "log_interval": "1", "tensorboard": "false",
                           "warmup": "1", "dropout": "0.1", "compile_mode": "default", **overrides})  # fmt: skip
    job = jobs_pb2.Job(id=f"job{i}", kind=jobs_pb2.JOB_KIND_TRAIN, train=spec, attempt=1)
    events: list[dict] = []
    ctx = JobContext(job, "w", lambda message, fraction, metrics: events.append(dict(metrics)), threading.Event(),
                     threading.Event())  # fmt: skip
    return handle(ctx).result, events


def test_every_run_asks_the_process_whether_its_compiled_code_stays(small_corpus, tmp_path, monkeypatch):
    """train() itself calls warm_start.before_run (the process's one CompiledReuse), whoever calls train(): a run of
    another compiled shape, or an eager one, after a compiled run drops dynamo's code and CUDA-graph trees first."""
    from trainer import train as train_module
    from trainer import warm_start

    resets, asked = [], []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(warm_start, "_process_reuse", CompiledReuse())  # as a new process
    real = warm_start.before_run
    monkeypatch.setattr(train_module, "before_run", lambda config: asked.append(config) or real(config))
    warm_start.before_run(fast_config(compile_mode="default"))  # as if a compiled run came before
    config = fast_config(max_steps=2, eval_interval=2)
    result = train_module.train(config, small_corpus, store_root=tmp_path / "s", run_dir=tmp_path / "r",
                                data_dir=tmp_path / "d")  # fmt: skip
    assert asked == [config] and resets == [1] and result.compiled_code_reused is False
    assert warm_start.before_run(fast_config(compile_mode="default")) is False and resets == [1]  # eager: none kept
    assert warm_start.before_run(fast_config(compile_mode="default", seed=9)) is True and resets == [1]


def test_a_workers_second_job_reuses_the_compiled_code_and_trains_the_same(small_corpus, tmp_path, monkeypatch):
    from trainer import warm_start
    from trainer.worker import TrainerPaths, make_train_handler

    torch._dynamo.reset()  # nothing compiled by an earlier test in this process
    monkeypatch.setattr(warm_start, "_process_reuse", CompiledReuse())  # nor remembered as compiled
    handle = make_train_handler(TrainerPaths(home=tmp_path, default_corpus=str(small_corpus)))
    first, first_events = _job(handle, 1, small_corpus)
    traced = counters["frames"]["ok"]
    second, second_events = _job(handle, 2, small_corpus)
    assert counters["frames"]["ok"] == traced  # no frame traced again: dynamo's code of job 1 ran job 2

    def losses(events):
        return [e["loss"] for e in events if "loss" in e and "val_loss" not in e]

    assert not first["compiled_code_reused"] and second["compiled_code_reused"]
    assert len(losses(first_events)) == 6 and losses(second_events) == losses(first_events)  # dropout on: same seed
    assert second["metrics"]["val_loss"] == first["metrics"]["val_loss"]
    for result, events in ((first, first_events), (second, second_events)):  # dequeued -> first step, recorded
        startup = next(e for e in events if "startup_s" in e)
        assert startup["startup_s"] >= startup["setup_s"] > 0 and math.isfinite(result["metrics"]["startup_s"])

    third, third_events = _job(handle, 3, small_corpus, block_size="16")  # another shape: compiled afresh
    assert not third["compiled_code_reused"] and counters["frames"]["ok"] > traced
    assert len(losses(third_events)) == 6 and all(math.isfinite(x) for x in losses(third_events))


class _FakeDriver:
    """Stands in for libcuda: records each call with the ordinal asked for, returns the codes it is given."""

    def __init__(self, codes: dict[str, int]) -> None:
        self.codes, self.calls = codes, []

    def _call(self, name: str, *args) -> int:
        self.calls.append(name)
        return self.codes.get(name, 0)

    def cuInit(self, flags):  # noqa: N802 - the driver's names
        return self._call("cuInit")

    def cuDeviceGet(self, device, ordinal):  # noqa: N802
        self.ordinal = ordinal
        return self._call("cuDeviceGet")

    def cuDevicePrimaryCtxRetain(self, context, device):  # noqa: N802
        return self._call("cuDevicePrimaryCtxRetain")


def test_cuda_preload_retains_the_primary_context_through_the_driver(monkeypatch):
    """preload_cuda's thread: cuInit, the device of the ordinal asked for, its primary context, stopping at the first
    error; without a driver library, nothing (torch does it all later)."""
    from trainer import warm_start

    for codes, want, calls in (
        ({}, "primary context ready", ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"]),
        ({"cuInit": 100}, "driver error 100 (step 1)", ["cuInit"]),  # 100: no device
        (
            {"cuDevicePrimaryCtxRetain": 2},
            "driver error 2 (step 3)",
            ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"],
        ),
    ):
        driver = _FakeDriver(codes)
        monkeypatch.setattr(warm_start.ctypes, "CDLL", lambda name, driver=driver: driver)
        assert warm_start._retain_primary_context(3) == want and driver.calls == calls
        assert codes.get("cuInit") or driver.ordinal == 3
    monkeypatch.setenv("TINYLM_CUDA_PRELOAD", "0")  # the switch: the driver is not touched
    assert warm_start._retain_primary_context(3) == "off (TINYLM_CUDA_PRELOAD=0)" and driver.calls == calls
    monkeypatch.undo()  # the real ctypes.CDLL again, on a library name that does not exist
    monkeypatch.setattr(warm_start, "CUDA_DRIVER", "libcuda-that-is-not-here.so.1")
    assert warm_start._retain_primary_context(0) == "no CUDA driver"


def test_preload_for_starts_what_the_config_needs_and_waiting_is_safe_without_one(monkeypatch):
    from trainer import warm_start

    started = []
    monkeypatch.setattr(warm_start, "_cuda_thread", None)
    monkeypatch.setattr(warm_start, "preload_cuda", lambda ordinal=None: started.append(("cuda", ordinal)))
    monkeypatch.setattr(warm_start, "preload_compiler", lambda: started.append(("compiler", None)))
    assert warm_start.wait_cuda_preload() < 1.0  # none started: returns at once
    for device, compile_mode, want in (("cpu", "default", [("compiler", None)]),
                                       ("cuda:1", "none", [("cuda", 1)]),
                                       ("auto", "reduce-overhead", [("cuda", None), ("compiler", None)])):  # fmt: skip
        started.clear()
        warm_start.preload_for(fast_config(device=device, compile_mode=compile_mode))
        assert started == want, device
