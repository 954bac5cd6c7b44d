"""`python -m model.classifier_main`: fine-tune a speaker classifier on the corpus, report held-out accuracy.

Builds the speaker task from the corpus (model/speaker_data.py: the top --speakers speakers, split by speech), puts a
`SequenceClassifier` on a GPT (a fresh --preset with a character tokenizer from the corpus, or a trained LM given by
--artifact), fine-tunes it briefly on the CPU (--finetune full | lora | head) and prints held-out accuracy beside the
majority-class baseline (--json for one machine-readable line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from model.artifact import ArtifactError, load_artifact
from model.classifier import POOLINGS, SequenceClassifier
from model.classifier_train import FINETUNE_MODES, FitConfig, accuracy, fit
from model.presets import PRESETS, get_preset
from model.speaker_data import UNITS, speaker_task
from model.tokenizers import CharTokenizer, Tokenizer
from model.transformer import GPT

__all__ = ["main"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.classifier_main", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("TINYLM_CORPUS"), help="the play text (default: $TINYLM_CORPUS)")
    p.add_argument("--artifact", type=Path, help="start from this trained LM artifact (its tokenizer too)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="fresh model when no --artifact")
    p.add_argument("--n-layer", type=int, help="override the preset's n_layer (fresh model only)")
    p.add_argument("--n-embd", type=int, help="override the preset's n_embd (fresh model only)")
    p.add_argument("--speakers", type=int, default=2, help="classes: the speakers with the most speeches")
    p.add_argument("--unit", default="line", choices=UNITS, help="an example is one line, or a whole speech")
    p.add_argument("--pooling", default="last", choices=POOLINGS)
    p.add_argument("--finetune", default="full", choices=FINETUNE_MODES)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=48, help="tokens kept per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p.parse_args(argv)


def _backbone(args: argparse.Namespace, text: str) -> tuple[GPT, Tokenizer]:
    if args.artifact:
        artifact = load_artifact(args.artifact)
        return artifact.model, artifact.tokenizer
    tokenizer = CharTokenizer.from_corpus(text)
    torch.manual_seed(args.seed)
    overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd)) if v is not None}
    config = get_preset(args.preset, vocab_size=tokenizer.vocab_size, block_size=args.max_len, dropout=0.0, **overrides)
    return GPT(config), tokenizer


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING, format="%(message)s")
    if not args.corpus or not Path(args.corpus).is_file():
        print("classifier_main needs the corpus: pass --corpus FILE or set TINYLM_CORPUS", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    text = Path(args.corpus).read_text(encoding="utf-8")
    try:
        task = speaker_task(text, args.speakers, unit=args.unit, seed=args.seed)
        config = FitConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            max_len=args.max_len,
            finetune=args.finetune,
            seed=args.seed,
        )
        gpt, tokenizer = _backbone(args, text)
    except (ValueError, ArtifactError) as err:
        print(f"classifier_main: {err}", file=sys.stderr)
        return 2
    if args.max_len > gpt.config.block_size:
        print(
            f"classifier_main: --max-len must be at most the model's block_size {gpt.config.block_size}",
            file=sys.stderr,
        )
        return 2
    train = [(tokenizer.encode(t), label) for t, label in task.train]
    held_out = [(tokenizer.encode(t), label) for t, label in task.held_out]
    clf = SequenceClassifier(gpt, len(task.classes), pooling=args.pooling)
    start = time.perf_counter()
    losses = fit(clf, train, config)
    report = {
        "classes": list(task.classes),
        "unit": args.unit,
        "train_examples": len(train),
        "held_out_examples": len(held_out),
        "finetune": args.finetune,
        "pooling": args.pooling,
        "steps": args.steps,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_s": round(time.perf_counter() - start, 1),
        "held_out_accuracy": accuracy(clf, held_out, args.max_len),
        "majority_accuracy": task.majority_accuracy(),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"classes: {', '.join(task.classes)} ({args.unit}s: {len(train)} train, {len(held_out)} held out)")
    print(
        f"fine-tuned ({args.finetune}, {args.pooling} pooling) for {args.steps} steps in {report['train_s']} s, "
        f"final loss {report['final_loss']:.3f}"
    )
    gain = 100 * (report["held_out_accuracy"] - report["majority_accuracy"])
    print(
        f"held-out accuracy {report['held_out_accuracy']:.3f} vs majority class {report['majority_accuracy']:.3f} "
        f"({gain:+.1f} points)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
