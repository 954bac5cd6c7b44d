"""Speculative decoding at batch 1: speed-up and acceptance rate of a `tiny` draft for a `shakespeare-char` target.

    python -m bench_svc.benches.speculative [--device cpu|cuda] [--corpus FILE] [--k 1,2,4]
                                            [--target-artifact DIR --draft-artifact DIR]

Random-init models agree on almost nothing, so unless artifacts are given both models are first trained on the
corpus with a plain AdamW loop (`--target-steps` / `--draft-steps`, capped by `--target-train-s` / `--draft-train-s`
of wall time; a character tokenizer built from the corpus, so both share it); `--draft-distill` trains the draft on
the trained target's next-token distributions instead of the corpus's tokens (a draft is meant to agree with its
target: the acceptance rate is what speculative decoding sells). Then, for greedy and for seeded
temperature-1 sampling, the anchor (the target alone: `model.generate.generate_tokens`) and `speculative_generate`
at every k run on the same held-out prompts in the same process, interleaved over `--repeats` rounds (medians).
Writes `<out-dir>/speculative-<device type>.{csv,json,png}` with the device, git commit, exact command, corpus and
anchor (the CSV as `# key: value` lines above the columns), and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench_svc.provenance import LOAD_KEYS, device_name, git_commit, machine_load, now_iso
from model.artifact import load_artifact, save_artifact
from model.generate import generate_tokens
from model.presets import get_preset
from model.sampling import SamplingParams
from model.speculative import speculative_generate
from model.tokenizers import CharTokenizer, Tokenizer
from model.transformer import GPT

__all__ = [
    "MODES",
    "build_parser",
    "format_table",
    "held_out_prompts",
    "main",
    "make_header",
    "result_row",
    "trained_models",
    "write_results",
]

MODULE = "bench_svc.benches.speculative"
log = logging.getLogger(MODULE)

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET_PRESET, DRAFT_PRESET = "shakespeare-char", "tiny"
VAL_FRACTION = 0.1  # the last 10% of the corpus: never trained on, prompts come from it
PROMPT_CHARS = 32
MODES = {"greedy": 0.0, "sample": 1.0}  # mode -> temperature


def build_parser(prog: str = f"python -m {MODULE}", description: str = "") -> argparse.ArgumentParser:
    """The options of the speculative benchmarks (this one and the engine's, bench_svc.benches.speculative_engine)."""
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--corpus", default=os.environ.get("TINYLM_CORPUS"), help="training text (default: $TINYLM_CORPUS)")
    p.add_argument("--target-artifact", type=Path, help="a trained shakespeare-char artifact (skips its training)")
    p.add_argument("--draft-artifact", type=Path, help="a trained draft artifact with the same tokenizer")
    p.add_argument(
        "--save-models",
        type=Path,
        help="save the two trained models as artifacts in this store (for "
        "--target-artifact / --draft-artifact in later runs)",
    )
    p.add_argument("--target-steps", type=int, default=600)
    p.add_argument("--draft-steps", type=int, default=300)
    p.add_argument("--target-train-s", type=float, default=150.0, help="wall-time cap of the target's training")
    p.add_argument("--draft-train-s", type=float, default=60.0, help="wall-time cap of the draft's training")
    p.add_argument(
        "--draft-distill",
        action="store_true",
        help="train the draft on the trained target's next-token distributions (soft labels: KL to the target, "
        "as DistillSpec) instead of the corpus's tokens",
    )
    p.add_argument("--batch", type=int, default=8, help="training sequences per step")
    p.add_argument("--seq", type=int, default=128, help="training sequence length (also the models' block_size)")
    p.add_argument("--k", default="1,2,4", help="draft lengths to measure, comma-separated")
    p.add_argument("--prompts", type=int, default=2, help="held-out prompts per measurement")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (batch-1 decoding gains little from more)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench_svc" / "results")
    return p


def _batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator, device: torch.device):
    """Endless random (x, y) windows of `data` (N,) long: x, y (batch, seq), y shifted by one."""
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).to(device)
        yield window[:, :-1], window[:, 1:]


def _train(
    model: GPT,
    data: torch.Tensor,
    steps: int,
    max_s: float,
    args: argparse.Namespace,
    lr: float,
    teacher: GPT | None = None,
) -> dict[str, float]:
    """AdamW with linear warm-up then cosine decay, gradient clipping at 1; stops early after max_s seconds. With a
    `teacher` (distillation) the loss is the cross-entropy against its softmax on the same windows (KL to the
    teacher plus its entropy), not against the corpus's next tokens; `train_loss` stays the latter (comparable)."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    warmup = max(1, steps // 20)
    batches = _batches(data, args.batch, args.seq, torch.Generator().manual_seed(args.seed), device)
    model.train()
    start, losses, step = time.perf_counter(), [], 0
    for step in range(1, steps + 1):
        progress = (step - warmup) / max(1, steps - warmup)
        scale = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.1)
        x, y = next(batches)
        logits, loss = model(x, y)
        if teacher is not None:
            with torch.no_grad():
                soft = F.softmax(teacher(x)[0].float(), dim=-1)  # (B, T, V)
            objective = -(soft * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        else:
            objective = loss
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            elapsed = time.perf_counter() - start
            log.info("  step %d/%d loss %.3f (%.0f s)", step, steps, sum(losses[-25:]) / 25, elapsed)
        if time.perf_counter() - start > max_s:
            break
    model.eval()
    tail = losses[-20:]
    return {"steps": step, "train_loss": sum(tail) / len(tail), "train_s": time.perf_counter() - start}


def trained_models(args: argparse.Namespace, text: str) -> tuple[GPT, GPT, Tokenizer, dict[str, Any]]:
    device = torch.device(args.device)
    if args.target_artifact and args.draft_artifact:
        target, draft = load_artifact(args.target_artifact, device), load_artifact(args.draft_artifact, device)
        if target.tokenizer.to_json() != draft.tokenizer.to_json():
            raise SystemExit("--target-artifact and --draft-artifact must share a tokenizer")
        return target.model, draft.model, target.tokenizer, {"target": str(target.path), "draft": str(draft.path)}
    tokenizer = CharTokenizer.from_corpus(text)
    data = torch.tensor(tokenizer.encode(text[: int(len(text) * (1 - VAL_FRACTION))]), dtype=torch.long)
    info: dict[str, Any] = {}
    models = []
    plan = (
        ("target", TARGET_PRESET, args.target_steps, args.target_train_s, 1e-3),
        ("draft", DRAFT_PRESET, args.draft_steps, args.draft_train_s, 2e-3),
    )
    for role, preset, steps, max_s, lr in plan:
        torch.manual_seed(args.seed)
        config = get_preset(preset, vocab_size=tokenizer.vocab_size, block_size=args.seq, dropout=0.0)
        model = GPT(config).to(device)
        log.info(
            "training the %s (%s, %.2fM parameters) for up to %d steps", role, preset, model.num_params() / 1e6, steps
        )
        teacher = models[0].eval() if role == "draft" and args.draft_distill else None
        info[role] = {
            "preset": preset,
            "params": model.num_params(),
            **_train(model, data, steps, max_s, args, lr, teacher),
            **({"distilled_from": "target"} if teacher is not None else {}),
        }
        models.append(model)
        if args.save_models:
            model_id = save_artifact(
                args.save_models,
                model,
                tokenizer,
                name=f"speculative-{role}",
                preset=preset,
                metrics={"train_loss": info[role]["train_loss"]},
            )
            info[role]["artifact"] = str(args.save_models / model_id)
            log.info("saved the %s as %s", role, args.save_models / model_id)
    return models[0], models[1], tokenizer, info


def held_out_prompts(text: str, tokenizer: Tokenizer, n: int) -> list[list[int]]:
    """The first PROMPT_CHARS characters of n speeches spread over the held-out tail of the corpus."""
    held_out = text[int(len(text) * (1 - VAL_FRACTION)) :]
    speeches = [s for s in held_out.split("\n\n")[1:] if len(s) >= PROMPT_CHARS]
    step = max(1, len(speeches) // max(n, 1))
    return [tokenizer.encode(s[:PROMPT_CHARS]) for s in speeches[::step][:n]]


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def _measure(
    target: GPT, draft: GPT, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per (mode, k), k = 0 being the anchor (the target alone), on the same prompts and seeds. Every
    configuration runs once per repeat, interleaved, so a change in machine load hits them alike; medians are
    reported. Also returns the ms per token of the target and the draft decoding alone (greedy)."""
    device = next(target.parameters()).device
    ks = [int(k) for k in args.k.split(",")]
    warm = SamplingParams(max_new_tokens=4, temperature=0.0)
    generate_tokens(draft, prompts[0], warm)
    speculative_generate(target, draft, prompts[0], warm, k=max(ks))
    params = {
        mode: [
            SamplingParams(max_new_tokens=args.max_new_tokens, temperature=t, seed=args.seed + i)
            for i in range(len(prompts))
        ]
        for mode, t in MODES.items()
    }
    jobs: dict[tuple[str, int], Callable[[], Any]] = {
        ("draft alone", 0): lambda: [(generate_tokens(draft, p, sp), None) for p, sp in zip(prompts, params["greedy"])]
    }
    for mode in MODES:
        jobs[(mode, 0)] = lambda mode=mode: [
            (generate_tokens(target, p, sp), None) for p, sp in zip(prompts, params[mode])
        ]
        for k in ks:
            jobs[(mode, k)] = lambda mode=mode, k=k: [
                speculative_generate(target, draft, p, sp, k=k) for p, sp in zip(prompts, params[mode])
            ]
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
    results: dict[tuple[str, int], Any] = {}
    for rep in range(args.repeats):
        for key, job in jobs.items():
            results[key], s = _timed(job, device)
            seconds[key].append(s)
        log.info("timing round %d/%d done", rep + 1, args.repeats)
    median = {key: statistics.median(v) for key, v in seconds.items()}
    n_tokens = len(prompts) * args.max_new_tokens
    rows = []
    for mode in MODES:
        anchor_tokens = [t for t, _ in results[(mode, 0)]]
        rows.append(
            result_row(
                mode,
                0,
                "target alone",
                n_tokens,
                median[(mode, 0)],
                median[(mode, 0)],
                None,
                None,
                target_forwards=n_tokens,
                draft_forwards=0,
            )
        )
        for k in ks:
            runs = results[(mode, k)]
            stats = {
                name: sum(s[name] for _, s in runs)
                for name in ("proposed", "accepted", "target_forwards", "draft_forwards")
            }
            same = [t for t, _ in runs] == anchor_tokens if MODES[mode] == 0.0 else None
            rows.append(
                result_row(
                    mode,
                    k,
                    "speculative",
                    n_tokens,
                    median[(mode, k)],
                    median[(mode, 0)],
                    stats["accepted"] / max(stats["proposed"], 1),
                    same,
                    target_forwards=stats["target_forwards"],
                    draft_forwards=stats["draft_forwards"],
                )
            )
    costs = {
        "target_ms_per_token": 1e3 * median[("greedy", 0)] / n_tokens,
        "draft_ms_per_token": 1e3 * median[("draft alone", 0)] / n_tokens,
    }
    costs["draft_to_target_cost"] = costs["draft_ms_per_token"] / costs["target_ms_per_token"]
    return rows, costs


def result_row(
    mode: str,
    k: int,
    impl: str,
    tokens: int,
    seconds: float,
    anchor_s: float,
    acceptance: float | None,
    same: bool | None,
    **counts: int | None,
) -> dict[str, Any]:
    """One results row: throughput, speed-up over the anchor's seconds, acceptance, `counts` (forward calls)."""
    return {
        "mode": mode,
        "k": k,
        "impl": impl,
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 2),
        "speedup_vs_target": round(anchor_s / seconds, 3),
        "acceptance_rate": None if acceptance is None else round(acceptance, 4),
        **counts,
        "same_tokens_as_target": same,
    }


def write_results(
    out_dir: Path, stem: str, header: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any], title: str
) -> list[Path]:
    """`<stem>.csv` (header as `# key: value` lines), `.json` and a two-panel `.png` (speed-up, acceptance vs k), one
    line per row series (`series`, else `mode`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".csv", ".json", ".png"))
    with open(csv_path, "w", newline="") as f:
        f.writelines(f"# {key}: {value}\n" for key, value in header.items())
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    document = {
        "suite": "speculative",
        "header": header,
        "summary": summary,
        "columns": list(rows[0]),
        "rows": rows,
        "plot": png_path.name,
    }
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_speed, ax_accept = fig.subplots(1, 2)
    for series in dict.fromkeys(r.get("series", r["mode"]) for r in rows):
        spec = [r for r in rows if r.get("series", r["mode"]) == series and r["k"] > 0]
        ks = [r["k"] for r in spec]
        ax_speed.plot(ks, [r["speedup_vs_target"] for r in spec], marker="o", label=series)
        ax_accept.plot(ks, [r["acceptance_rate"] for r in spec], marker="o", label=series)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set(xlabel="draft tokens per round (k)", ylabel="speed-up vs target alone (x)")
    ax_accept.set(xlabel="draft tokens per round (k)", ylabel="acceptance rate", ylim=(0, 1))
    for ax in (ax_speed, ax_accept):
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{title}\n{header['device']} @ {header['git_commit'][:12]}", fontsize=9)
    fig.savefig(png_path, dpi=110)
    return [csv_path, json_path, png_path]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'series':<18} {'k':>2} {'tok/s':>8} {'speed-up':>8} {'accept':>7} {'target fwd':>10} {'same':>5}"]
    for r in rows:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = "-" if r["same_tokens_as_target"] is None else str(r["same_tokens_as_target"])
        lines.append(
            f"{r.get('series', r['mode']):<18} {r['k']:>2} {r['tokens_per_s']:>8.1f} "
            f"{r['speedup_vs_target']:>7.2f}x {accept:>7} {str(r.get('target_forwards') or '-'):>10} {same:>5}"
        )
    return "\n".join(lines)


def make_header(
    args: argparse.Namespace, module: str, argv: list[str] | None, anchor: str, commit: str
) -> dict[str, Any]:
    """The results header: device, `commit` (taken when the run started: edits made while it ran are not its code),
    the command as typed, time, the machine's load, the anchor, corpus, torch and threads."""
    return {
        "device": device_name(torch.device(args.device)),
        "git_commit": commit,
        "command": shlex.join([sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]),
        "created": now_iso(),
        LOAD_KEYS[0]: machine_load(),
        "anchor": anchor,
        "corpus": str(args.corpus) if not (args.target_artifact and args.draft_artifact) else "",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    """Train (or load) both models, measure, write the results; returns the exit code."""
    args = build_parser().parse_args(argv)
    commit = git_commit()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.corpus or not Path(args.corpus).is_file():
        print(f"{MODULE} needs the corpus: pass --corpus FILE or set TINYLM_CORPUS", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    text = Path(args.corpus).read_text(encoding="utf-8")
    target, draft, tokenizer, training = trained_models(args, text)
    prompts = held_out_prompts(text, tokenizer, args.prompts)
    rows, costs = _measure(target, draft, prompts, args)
    device = torch.device(args.device)
    header = make_header(
        args,
        MODULE,
        argv,
        f"target alone (model.generate.generate_tokens, greedy) = {rows[0]['tokens_per_s']} tokens/s",
        commit,
    )
    summary = {
        "training": training,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        **costs,
        "best_speedup": max(r["speedup_vs_target"] for r in rows if r["k"] > 0),
    }
    paths = write_results(
        args.out_dir,
        f"speculative-{device.type}" + ("-distilled" if args.draft_distill else ""),
        header,
        rows,
        summary,
        f"speculative decoding, {DRAFT_PRESET} draft for {TARGET_PRESET}, batch 1",
    )
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    print(format_table(rows))
    print(
        f"decoding alone: target {costs['target_ms_per_token']:.1f} ms/token, draft {costs['draft_ms_per_token']:.1f}"
        f" ms/token (draft/target cost {costs['draft_to_target_cost']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
