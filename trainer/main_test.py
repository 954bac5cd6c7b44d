"""`tinylm train` and `trainer.main serve`: flags, environment, exit codes, the artifact id on stdout."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobs.testing import RedisServer
from protos import common_pb2, trainer_pb2_grpc
from rpc.client import channel
from trainer.main import main, tinylm_home
from trainer.testing import write_small_corpus

FAST = ["device=cpu", "max_steps=4", "batch_size=4", "block_size=32", "eval_interval=2", "eval_iters=2",
        "warmup=1", "tensorboard=false"]  # fmt: skip


def test_train_prints_the_artifact_id(tmp_path, capsys):
    env = {"TINYLM_HOME": str(tmp_path / "home"), "TINYLM_CORPUS": str(write_small_corpus(tmp_path / "c.txt"))}
    assert main(["--preset", "tiny", "--name", "cli-test", "--no-progress", *FAST], env) == 0
    out, err = capsys.readouterr()
    model_id = out.strip()
    assert (tmp_path / "home" / "artifacts" / model_id / "manifest.json").is_file()
    assert "cli-test" in err and "run folder" in err
    (run,) = (tmp_path / "home" / "runs").iterdir()
    assert run.name.startswith("cli-test-") and (run / "log.csv").is_file()


def test_yaml_config_and_log_dir(tmp_path, capsys):
    env = {"TINYLM_HOME": str(tmp_path / "home"), "TINYLM_CORPUS": str(write_small_corpus(tmp_path / "c.txt"))}
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny\nmax_steps: 2\nlr: 2e-3\n")
    run_dir = tmp_path / "myrun"
    assert main(["train", "--config", str(cfg), *FAST[:1], *FAST[2:], f"log_dir={run_dir}", "-q"], env) == 0
    assert (run_dir / "resume" / "state.json").is_file()
    assert '"step": 2' in (run_dir / "resume" / "state.json").read_text()


@pytest.mark.parametrize(
    "args, words",
    [
        (["lr=-1"], "lr must be a number in (0.0, 10.0]"),
        (["nope=3"], "unknown config key 'nope'"),
        (["--preset", "huge"], "preset must be one of"),
        (["lr"], "key=value"),
    ],
)
def test_bad_overrides_exit_2_naming_the_key(tmp_path, capsys, args, words):
    assert main(args, {"TINYLM_HOME": str(tmp_path)}) == 2
    assert words in capsys.readouterr().err


def test_missing_corpus_exits_1(tmp_path, capsys):
    env = {"TINYLM_HOME": str(tmp_path), "TINYLM_CORPUS": str(tmp_path / "missing.txt")}
    assert main(FAST, env) == 1
    assert "missing.txt" in capsys.readouterr().err


def test_serve_needs_a_redis_url(capsys):
    assert main(["serve"], {}) == 2
    assert "TINYLM_REDIS_URL" in capsys.readouterr().err


def test_home_default():
    assert tinylm_home({}).name == ".tinylm"
    assert str(tinylm_home({"TINYLM_HOME": "/x/y"})) == "/x/y"


def test_serve_starts_the_service_and_stops_on_sigterm(tmp_path):
    root = Path(__file__).resolve().parent.parent
    with RedisServer() as redis_server:
        env = dict(os.environ, TINYLM_HOME=str(tmp_path), TINYLM_REDIS_URL=redis_server.url, PYTHONPATH=str(root))
        proc = subprocess.Popen([sys.executable, "-m", "trainer.main", "serve", "--workers", "1"], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        try:
            line = proc.stdout.readline()
            assert line.startswith("TrainerService listening on 127.0.0.1:"), line
            address = line.split()[3]
            ch = channel(address)
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="tinylm.v1.TrainerService"), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            listing = trainer_pb2_grpc.TrainerServiceStub(ch).ListModels(common_pb2.ListModelsRequest(), timeout=10)
            assert list(listing.models) == []
            ch.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
