"""The ORT decode step by position: the past -> present graph against the fixed-KV graph, and that graph with INT8's
small-batch twin taking the one-row steps (inference_svc/PERF_NOTES.md sections 12-14).

    python -m bench_svc.benches.ort_kv_positions [--runs 21] [--threads 1]

A random-init shakespeare-char model is exported to INT8 (both graphs, `export_artifact`, gates off) in a temp
folder. Three `OrtRunner`s (fixed_kv False; True without and with the small-batch twin) each decode one sequence from
a 6-token prompt up to position block_size - 27 (229), feeding the argmax back, then release it. After one warm-up
each, `--runs` runs alternate the order of the graphs; per run, the median step over the first and the last 20
positions. Prints, per graph, the median over runs and the best run (this machine's speed drifts: compare only
figures of one invocation).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from exporter.export import export_artifact
from exporter.parity import ParitySettings
from inference_svc.ort_runner import OrtRunner
from model.artifact import save_artifact
from model.config import ModelConfig
from model.presets import get_preset
from model.tokenizers import CharTokenizer
from model.transformer import GPT

__all__ = ["export_int8", "step_times", "compare", "main"]

PROMPT = "ROMEO:"  # 6 characters, as in PERF_NOTES 12
# Tiny Shakespeare's 65 characters: the vocabulary (and LM head) of a shakespeare-char model trained on it
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
WINDOW = 20  # positions per reported window
# name -> (fixed_kv, small_batch) of its OrtRunner
GRAPHS = {"past-present": (False, False), "fixed-kv": (True, False), "fixed-kv small-batch": (True, True)}
_SMALL_PARITY = ParitySettings(
    n_prompts=1, prompt_len=8, decode_prompts=1, decode_prompt_len=4, decode_steps=4, eval_tokens=256
)


def export_int8(store: Path, config: ModelConfig, tokenizer: CharTokenizer) -> Path:
    """A random-init model of `config` saved in `store` and exported to INT8 (both graphs); its artifact folder."""
    torch.manual_seed(0)
    model = GPT(config.replace(vocab_size=tokenizer.vocab_size))
    path = store / save_artifact(store, model, tokenizer, name="ort-kv-positions", preset="bench")
    export_artifact(path, ["int8"], no_gate=True, settings=_SMALL_PARITY)
    return path


def step_times(runner: OrtRunner, prompt: list[int], end: int) -> list[float]:
    """Seconds per decode step at positions len(prompt) .. end - 1 (greedy), one sequence in slot 0, released after."""
    token = int(runner.prefill([0], [prompt]).argmax())
    times = []
    for pos in range(len(prompt), end):
        start = time.perf_counter()
        logits = runner.decode([0], [token], [pos])
        times.append(time.perf_counter() - start)
        token = int(logits.argmax())
    runner.release(0)
    return times


def compare(path: Path, prompt: list[int], end: int, runs: int, threads: int) -> dict[str, dict[str, list[float]]]:
    """Per graph, each run's median ms over the first and the last WINDOW decode positions (the last step at end - 1)."""
    runners = {
        name: OrtRunner(path, 1, variant="int8", threads=threads, fixed_kv=fixed, small_batch=small)
        for name, (fixed, small) in GRAPHS.items()
    }
    for runner in runners.values():
        step_times(runner, prompt, end)  # warm-up
    result = {name: {"first": [], "last": []} for name in runners}
    for run in range(runs):
        for name in list(runners)[:: 1 if run % 2 == 0 else -1]:  # alternate the order
            ms = [t * 1e3 for t in step_times(runners[name], prompt, end)]
            result[name]["first"].append(statistics.median(ms[:WINDOW]))
            result[name]["last"].append(statistics.median(ms[-WINDOW:]))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=21, help="interleaved runs per graph")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (and torch's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, config = CharTokenizer.from_corpus(SHAKESPEARE_CHARS), get_preset("shakespeare-char")
    prompt_len, end = len(PROMPT), config.block_size - 26  # 230 at 256: the last step at 229, as in PERF_NOTES 12
    with tempfile.TemporaryDirectory() as store:
        path = export_int8(Path(store), config, tokenizer)
        result = compare(path, tokenizer.encode(PROMPT), end, args.runs, args.threads)
    print(
        f"ms per decode step, positions {prompt_len}-{prompt_len + WINDOW - 1} and {end - WINDOW}-{end - 1}: median of {args.runs} runs (best)"
    )
    for name, windows in result.items():
        cells = [f"{statistics.median(v):.3f} ({min(v):.3f})" for v in windows.values()]
        print(f"{name:<22} {cells[0]:>16} {cells[1]:>16}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
