"""CI artifacts: train the `tiny` preset briefly on CPU, export every format, apply the gates.

    python -m tools.ci_artifacts OUTDIR --corpus tinyshakespeare.txt [--steps 150]

Leaves in OUTDIR: `store/<model_id>/` (the artifact with onnx/, coreml/, hf/ and parity.json), a copy of
`parity.json` at the top, and the training run folder. Exit status: 0 all gates passed, 1 a gate failed
(the files are kept, marked failed, so CI can upload them), 2 bad usage.
Training goes through the trainer library (`trainer.train`), the same loop `./tinylm train` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

__all__ = ["CI_STEPS", "train_tiny", "main"]

CI_STEPS = 150


def train_tiny(corpus: Path, out_dir: Path, steps: int = CI_STEPS, seed: int = 1337) -> str:
    """Train the tiny preset (char tokenizer, CPU) for `steps` steps into `out_dir/store`; returns the model id.

    Settings are cut for a 2-core machine (4 x 128 tokens a step, short warm-up, a high learning rate) and
    still reach a loss where quantization differences are measurable.
    """
    from trainer.config import load_config
    from trainer.train import train

    config = load_config("tiny").replace(
        device="cpu", tokenizer="char", max_steps=steps, batch_size=4, block_size=0, lr=3e-3, min_lr=3e-4, warmup=10,
        eval_interval=max(1, steps // 3), eval_iters=4, log_interval=steps, tensorboard=False, seed=seed,
        name="ci-tiny",
    )  # fmt: skip
    result = train(config, corpus, store_root=out_dir / "store", run_dir=out_dir / "run", data_dir=out_dir / "data")
    if result.model_id is None:
        raise RuntimeError(f"training stopped ({result.stopped}) without producing an artifact")
    return result.model_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ci_artifacts", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="folder for the artifact, its exports and parity.json")
    parser.add_argument("--corpus", type=Path, required=True, help="training text (CI passes $TINYLM_CORPUS)")
    parser.add_argument("--steps", type=int, default=CI_STEPS, help=f"training steps (default {CI_STEPS})")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        parser.error(f"--corpus: {args.corpus} is not a file")
    if args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")

    from exporter.export import export_artifact
    from exporter.parity import held_out_text
    from exporter.parity_table import format_table

    args.outdir.mkdir(parents=True, exist_ok=True)
    model_id = train_tiny(args.corpus, args.outdir, args.steps)
    artifact = args.outdir / "store" / model_id
    report = export_artifact(
        artifact,
        None,  # every format
        eval_text=held_out_text(args.corpus.read_text(encoding="utf-8")),
        no_gate=True,  # keep the files either way; the exit status carries the verdict
        progress=lambda message, fraction: print(f"[{fraction:4.0%}] {message}", flush=True),
    )
    shutil.copyfile(artifact / "parity.json", args.outdir / "parity.json")
    print(format_table(report))
    print(json.dumps({"model_id": model_id, "artifact": str(artifact), "passed": report["passed"]}))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
