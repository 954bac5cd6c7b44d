"""The tiny preset learns Tiny Shakespeare on a CPU: ~4.2 (uniform over 65 characters) to below 2.5 in 200 steps."""

import math

from model.artifact import load_artifact
from trainer.testing import fast_config
from trainer.run_log import read_log
from trainer.train import train


def test_tiny_learns_shakespeare_in_200_steps(shakespeare, dirs):
    cfg = fast_config(max_steps=200, batch_size=8, block_size=64, eval_interval=100, eval_iters=4, log_interval=10,
                      tensorboard=True)  # fmt: skip
    result = train(cfg, shakespeare, **dirs)
    assert result.stopped == "completed" and result.steps == 200
    assert abs(result.losses[0] - math.log(65)) < 0.3  # a fresh model is uniform over 65 characters
    assert result.metrics["val_loss"] < 2.5 and sum(result.losses[-10:]) / 10 < 2.5
    assert len(result.grad_norms) == 200 and all(math.isfinite(g) and g > 0 for g in result.grad_norms)
    art = load_artifact(dirs["store_root"] / result.model_id)
    assert art.manifest["metrics"]["val_loss"] == result.metrics["val_loss"]
    assert art.config.vocab_size == art.tokenizer.vocab_size == 65 and art.config.block_size == 64
    rows = read_log(dirs["run_dir"] / "log.csv")
    assert [int(r["step"]) for r in rows if r["kind"] == "eval"] == [100, 200]
    assert len([r for r in rows if r["kind"] == "train"]) == 20
    assert (dirs["run_dir"] / "curve.png").stat().st_size > 1000
    assert any((dirs["run_dir"] / "tb").iterdir())
