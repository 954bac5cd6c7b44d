"""CPU decode latency: PyTorch eager against ONNX Runtime fp32 / INT8 / INT4, with a KV cache, batch 1 and 8.

    python -m bench_svc.benches.export_decode [--presets shakespeare-char,medium] [--model ARTIFACT]
                                              [--out-dir bench_svc/results]

Per preset (random-init weights: latency does not depend on weight values) the model is exported and
quantized into a temp folder; each engine prefills a prompt, then runs `--steps` one-token decode steps
feeding its own KV cache (PyTorch: `model.forward_cached` + `KVCache`, as the torch serving backend; ORT:
present -> past, as the ORT backend). Reported: per-step latency p50/p95 (one token for every row of the
batch) after warm-up steps. Torch and ORT get the same thread count. Writes export-cpu.csv, .json (through the
harness's writer: CPU model, git commit, exact command, time, load) and .png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench_svc.provenance import Anchor, cpu_device_name, make_header
from bench_svc.results_io import write_results

__all__ = ["bench_decode", "main"]

ENGINES = ("torch-eager", "ort-fp32", "ort-int8", "ort-int4")
BATCHES = (1, 8)
PROMPT_LEN = 32
RESULT_STEM = "export-cpu"
MODULE = "bench_svc.benches.export_decode"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean())}


def _time_steps(step: Callable[[int], None], steps: int, warmup: int) -> list[float]:
    """Run step(t) for warmup + steps decode steps; return the timed ones' durations in seconds."""
    times = []
    for t in range(warmup + steps):
        start = time.perf_counter()
        step(t)
        if t >= warmup:
            times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def _torch_decode(model: Any, prompt: np.ndarray, steps: int, warmup: int) -> list[float]:
    from model.kv_cache import KVCache

    batch, plen = prompt.shape
    cache = KVCache(batch, model.config, max_len=plen + warmup + steps)
    slots = torch.arange(batch)
    logits = model.forward_cached(torch.from_numpy(prompt), cache, slots, torch.zeros(batch, dtype=torch.long))
    token = logits[:, -1].argmax(-1)

    def step(t: int) -> None:
        nonlocal token
        out = model.forward_cached(token[:, None], cache, slots, torch.full((batch,), plen + t))
        token = out[:, 0].argmax(-1)

    return _time_steps(step, steps, warmup)


def _ort_decode(path: Path, prompt: np.ndarray, steps: int, warmup: int, threads: int) -> list[float]:
    from exporter.onnx_runner import OnnxDecoder

    decoder = OnnxDecoder(path, threads=threads)
    logits, past = decoder.prefill(prompt)
    token = logits[:, -1].argmax(-1)

    def step(t: int) -> None:
        nonlocal token, past
        out, past = decoder.step(token[:, None], past)
        token = out[:, 0].argmax(-1)

    return _time_steps(step, steps, warmup)


def _export_all(model: Any, folder: Path) -> dict[str, Path]:
    from model.onnx_contract import VARIANT_FILES
    from exporter.onnx_export import export_fp32
    from exporter.onnx_quantize import quantize_int4, quantize_int8

    paths = {v: folder / VARIANT_FILES[v] for v in ("fp32", "int8", "int4")}
    export_fp32(model, paths["fp32"])
    quantize_int8(paths["fp32"], paths["int8"])
    quantize_int4(paths["fp32"], paths["int4"])
    return paths


def bench_decode(
    model: Any, label: str, steps: int, warmup: int, threads: int, onnx_dir: Path | None = None
) -> list[dict[str, Any]]:
    """Rows (one per engine and batch) of decode latency for `model`; exports into a temp folder unless
    `onnx_dir` already holds model.onnx, model-int8.onnx and model-int4.onnx."""
    from model.onnx_contract import VARIANT_FILES

    model = model.float().eval()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as tmp:
        have = onnx_dir is not None and all((onnx_dir / VARIANT_FILES[v]).is_file() for v in ("fp32", "int8", "int4"))
        paths = (
            {v: onnx_dir / VARIANT_FILES[v] for v in ("fp32", "int8", "int4")}
            if have
            else _export_all(model, Path(tmp))
        )
        rng = np.random.default_rng(0)
        for batch in BATCHES:
            prompt = rng.integers(0, model.config.vocab_size, (batch, PROMPT_LEN), dtype=np.int64)
            results = {"torch-eager": _torch_decode(model, prompt, steps, warmup)}
            for variant in ("fp32", "int8", "int4"):
                results[f"ort-{variant}"] = _ort_decode(paths[variant], prompt, steps, warmup, threads)
            base = _percentiles(results["torch-eager"])["p50_ms"]
            for engine in ENGINES:
                stats = _percentiles(results[engine])
                rows.append({
                    "model": label, "params": model.num_params(), "engine": engine, "batch": batch, **stats,
                    "tokens_per_s": batch * 1e3 / stats["p50_ms"], "speedup_vs_torch_p50": base / stats["p50_ms"],
                })  # fmt: skip
                print(f"{label:>18} b={batch} {engine:<12} p50 {stats['p50_ms']:8.2f} ms  p95 {stats['p95_ms']:8.2f} ms"
                      f"  x{base / stats['p50_ms']:.2f} vs torch", flush=True)  # fmt: skip
    return rows


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda g: (g[0], g[1]))
    fig, ax = plt.subplots(figsize=(2.4 * len(groups) + 2, 4.5))
    width = 0.8 / len(ENGINES)
    for i, engine in enumerate(ENGINES):
        values = [
            next(r["p50_ms"] for r in rows if (r["model"], r["batch"]) == g and r["engine"] == engine) for g in groups
        ]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=engine)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], [f"{m}\nbatch {b}" for m, b in groups])
    ax.set_ylabel("decode step p50 (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="shakespeare-char,medium", help="model presets to time (random init)")
    p.add_argument("--model", type=Path, help="also time this artifact folder (its onnx/ files when present)")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench_svc" / "results", help="where export-cpu.* go")
    p.add_argument("--steps", type=int, default=48, help="timed decode steps per engine and batch")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT alike")
    p.add_argument("--quick", action="store_true", help="12 steps, shakespeare-char only unless --presets is given")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps must be >= 1, --warmup >= 0, --threads >= 1")
    if args.quick:
        args.steps = min(args.steps, 12)
        if "--presets" not in " ".join(argv):
            args.presets = "shakespeare-char"

    import onnxruntime

    from model.artifact import load_artifact
    from model.presets import get_preset
    from model.transformer import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    rows = []
    for name in [n.strip() for n in args.presets.split(",") if n.strip()]:
        rows += bench_decode(
            GPT(get_preset(name, dropout=0.0)), f"{name} (random)", args.steps, args.warmup, args.threads
        )
    if args.model is not None:
        art = load_artifact(args.model)
        rows += bench_decode(art.model, art.manifest["id"], args.steps, args.warmup, args.threads, args.model / "onnx")
    header = make_header(
        cpu_device_name(),
        REPO_ROOT,
        [sys.executable, "-m", MODULE, *argv],
        Anchor("torch-eager at the same model and batch (speedup_vs_torch_p50)"),
    )
    summary = {
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "weights": "random init for presets (decode latency does not depend on the weight values)",
        "metric": f"latency of one decode step (one new token per row) after a {PROMPT_LEN}-token prefill; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps",  # fmt: skip
        "seconds": round(time.time() - start, 1),
    }
    paths = write_results(args.out_dir, "export", header, rows, summary=summary, stem=RESULT_STEM)
    png = args.out_dir / f"{RESULT_STEM}.png"
    _plot(rows, png, f"{header.device}, {args.threads} thread(s), commit {header.git_commit[:12]}")
    print(f"wrote {', '.join(str(p) for p in [*paths, png])} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
