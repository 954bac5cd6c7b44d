"""GPU diagnostics for the trainer: where a step's time goes, and whether state left by one run harms the next.

    python -m tools.train_probe profile [--variants tinylm,eager-pytorch] [--steps 20]
    python -m tools.train_probe carryover [--steps 150]
    python -m tools.train_probe muon-eager [--ways eager,graph] [--threads 1]

`profile`: for each variant (shakespeare-char, nanoGPT's batch 64 x 256, bf16), warm-up steps, then wall ms per
step with one sync per step, and a torch.profiler capture of a few steps: device-busy ms per step, kernels per
step, the top kernels. `carryover`: kernel checks on poisoned memory (the caching allocator refilled with NaN
first: a kernel that reads memory nothing wrote shows NaN), then a compiled run, the checks again, then an eager
run with our kernels and one without, each compared step by step with the same variant run in a fresh process.
`muon-eager`: trainer/muon_gpu_test.py's short Muon run (120 steps, evals at 40/80/120) in the eager loop, plainly
and with one difference from the captured step at a time (contiguous batches, autocast's weight-cast cache off, the
learning rate a device tensor, the Newton-Schulz iteration in float32, cuBLAS's reduced-precision bf16 reductions
off), then the eager model captured whole; and two deliberate bugs (every learning rate x0.8, x0.5) to show how far
a real difference moves the losses against how far rounding alone does; beside the evaluations, the mean training loss
over the first 10/30/60 steps, where rounding has not yet been amplified (a candidate for a sharper test).
A diagnostic tool, not a benchmark: it prints tables, and the numbers go into notes, not into results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_svc.benches.training import gpu_variants
from trainer.corpus import resolve_corpus
from trainer.data import prepare_data
from trainer.distributed import SINGLE
from tools.profiling import kernel_events, top_host, top_kernels
from trainer.train import _setup, _train_step, kernel_scope, train


def _config(variant: str, steps: int, eval_interval: int):
    """The training benchmark's variant `variant` (bench_svc.benches.training), run for `steps` steps."""
    variants = gpu_variants(eval_interval)
    if variant not in variants:
        raise SystemExit(f"tools.train_probe: unknown variant {variant!r}; choose from {sorted(variants)}")
    return variants[variant].replace(max_steps=steps, eval_iters=10, log_interval=1)


def _poison() -> None:
    """Fill most of the caching allocator's free memory with NaN, then free it."""
    blocks = [torch.full((64 << 20,), float("nan"), device="cuda") for _ in range(32)]  # 8 GiB fp32
    del blocks


def kernel_checks() -> dict[str, float]:
    """Relative errors of our kernels against PyTorch at the trainer's shapes, on poisoned memory."""
    from kernels import flash_attention as fa
    from kernels import fused_add_norm

    out = {}
    _poison()
    torch.manual_seed(0)
    B, T, H, D = 64, 256, 6, 64
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))  # the model's views
    y = fa.flash_attention(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    out["flash_fwd"] = float((y.float() - ref).norm() / ref.norm())
    g = torch.randn_like(y)
    (dq,) = torch.autograd.grad(y, qkv, g)
    (dref,) = torch.autograd.grad(ref, qkv, g.float())
    out["flash_bwd"] = float((dq.float() - dref.float()).norm() / dref.norm())
    with torch.no_grad():
        y2 = fa.flash_attention(q, k, v, causal=True)
    out["flash_fwd_nograd"] = float((y2.float() - ref).norm() / ref.norm())
    x = torch.randn(B * T, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(384, device="cuda", requires_grad=True)
    b = torch.randn(384, device="cuda", requires_grad=True)
    yl = fused_add_norm.layer_norm(x, w, b, 1e-5)
    rl = F.layer_norm(x.float(), (384,), w, b, 1e-5)
    out["ln_fwd"] = float((yl.float() - rl).norm() / rl.norm())
    gl = torch.randn_like(yl)
    dx, dw = torch.autograd.grad(yl, (x, w), gl)
    rx, rw = torch.autograd.grad(rl, (x, w), gl.float())
    out["ln_bwd_x"] = float((dx.float() - rx).norm() / rx.norm())
    out["ln_bwd_w"] = float((dw - rw).norm() / rw.norm())
    out["nan_anywhere"] = float(any(torch.isnan(t).any() for t in (y, dq, y2, yl, dx, dw)))
    return out


def _run(variant: str, steps: int, eval_interval: int, workdir: Path, corpus: Path) -> dict:
    config = _config(variant, steps, eval_interval)
    losses, evals = [], []

    def cb(step, m):
        if "val_loss" in m:
            evals.append((step, round(m["train_loss"], 4), round(m["val_loss"], 4)))
        elif "loss" in m:
            losses.append(m["loss"])

    t0 = time.perf_counter()
    train(
        config,
        corpus,
        store_root=workdir / "store",
        run_dir=workdir / f"run-{variant}-{time.time_ns()}",
        data_dir=workdir / "data",
        progress_callback=cb,
    )
    return {"variant": variant, "losses": losses, "evals": evals, "wall_s": time.perf_counter() - t0}


def carryover(args: argparse.Namespace, workdir: Path, corpus: Path) -> None:
    rows = [("fresh", kernel_checks())]
    seq = []
    for variant in args.sequence.split(","):
        seq.append(_run(variant, args.steps, args.eval_interval, workdir, corpus))
        rows.append((f"after {variant}", kernel_checks()))
    fresh = {}
    for variant in sorted({r["variant"] for r in seq[1:]}):  # the same variants alone, each in a new process
        out = workdir / f"fresh-{variant}.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.train_probe",
                "single",
                "--variant",
                variant,
                "--steps",
                str(args.steps),
                "--eval-interval",
                str(args.eval_interval),
                "--json",
                str(out),
            ],
            check=True,
        )
        fresh[variant] = json.loads(out.read_text())
    print("\n== kernel checks (relative error vs PyTorch on poisoned memory)")
    for name, checks in rows:
        print(f"{name:<24}", " ".join(f"{k}={v:.2e}" for k, v in checks.items()))
    print("\n== in-process sequence vs fresh process (step losses: mean |diff| over steps, evals)")
    for i, r in enumerate(seq):
        f = fresh.get(r["variant"])
        diff = "-"
        if f is not None and i > 0:
            n = min(len(f["losses"]), len(r["losses"]))
            diff = f"{sum(abs(a - b) for a, b in zip(f['losses'][:n], r['losses'][:n])) / max(n, 1):.4f}"
        print(
            f"{i}:{r['variant']:<16} last-loss {r['losses'][-1]:.4f} evals {r['evals']} | fresh evals "
            f"{f['evals'] if f else '-'} | mean|dloss| {diff}"
        )


def profile(args: argparse.Namespace, workdir: Path, corpus: Path) -> None:
    table = []
    for variant in args.variants.split(","):
        config = _config(variant, 10_000, 10_000)
        prepare_data(corpus, "char", workdir / "data")
        torch.backends.cuda.matmul.allow_tf32 = True
        with kernel_scope(config):
            run = _setup(
                config,
                corpus,
                workdir / f"p-{variant}",
                workdir / "data",
                SINGLE,
                torch.device("cuda"),
            )
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                _train_step(run)
                run.step += 1
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _train_step(run)
                run.step += 1
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
            n_prof = 5
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                for _ in range(n_prof):
                    _train_step(run)
                    run.step += 1
                torch.cuda.synchronize()
        annotations = ("forward", "backward", "optimizer")
        from torch._dynamo.utils import counters

        print(
            f"\n[{variant}] dynamo: unique graphs {counters['stats'].get('unique_graphs', 0)}, graph breaks "
            f"{sum(counters['graph_break'].values())} {dict(list(counters['graph_break'].items())[:3])}"
        )
        counters.clear()
        kernels = kernel_events(prof, annotations)
        print(
            f"\n[{variant}] top host ops (self CPU ms/step): "
            + ", ".join(f"{name} {us / 1e3:.2f}" for name, us in top_host(prof, n_prof, n=12, width=40))
        )
        if os.environ.get("OUT"):
            prof.export_chrome_trace(str(Path(os.environ["OUT"]) / f"trace-{variant}.json"))
        busy_ms = sum(e.device_time for e in kernels) / 1e3 / n_prof
        top = ", ".join(f"{n} {us / 1e3:.2f}" for n, us in top_kernels(kernels, n_prof, width=60))
        tok_s = config.batch_size * config.block_size * config.grad_accum / (wall_ms / 1e3)
        table.append((variant, warm_s, wall_ms, busy_ms, len(kernels) / n_prof, tok_s))
        print(f"\n[{variant}] top kernels (ms/step): {top}")
        del run
        torch.cuda.empty_cache()
    print(f"\n{'variant':<16} {'warmup s':>9} {'wall ms':>8} {'busy ms':>8} {'kern/step':>9} {'tok/s':>10}")
    for v, w, ms, busy, nk, tok in table:
        print(f"{v:<16} {w:>9.1f} {ms:>8.2f} {busy:>8.2f} {nk:>9.0f} {tok:>10,.0f}")


def _sdpa_state() -> str:
    b = torch.backends.cuda
    order = torch._C._get_sdp_priority_order() if hasattr(torch._C, "_get_sdp_priority_order") else "?"
    return (
        f"flash={b.flash_sdp_enabled()} cudnn={b.cudnn_sdp_enabled()} efficient={b.mem_efficient_sdp_enabled()} "
        f"math={b.math_sdp_enabled()} priority={order}"
    )


def _sdpa_kernels() -> str:
    """Which kernels eager SDPA with dropout runs, forward and backward, at the trainer's shape."""
    q, k, v = (torch.randn(64, 6, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True).sum().backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return ", ".join(
        sorted(n[:50] for n in names if any(w in n.lower() for w in ("fmha", "flash", "cudnn", "attention", "sdpa")))
    )


def sdpa(args: argparse.Namespace, workdir: Path, corpus: Path) -> None:
    """SDPA's backend choice before and after a torch.compile run, and training with each backend forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("fresh:          ", _sdpa_state(), "|", _sdpa_kernels())
    _run("tinylm", 5, 5, workdir, corpus)
    print("after compile:  ", _sdpa_state(), "|", _sdpa_kernels())
    rows = []
    for name in args.backends.split(","):
        backend = getattr(SDPBackend, name)
        with sdpa_kernel([backend]):
            r = _run("eager-pytorch", args.steps, args.eval_interval, workdir, corpus)
        tail = r["losses"][-50:]
        rows.append((name, sum(tail) / len(tail), r["evals"]))
    print(f"\n{'backend':<20} {'train loss (last 50)':>20}  evals")
    for name, loss, evals in rows:
        print(f"{name:<20} {loss:>20.4f}  {evals}")


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _muon_changes() -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """Each a context under which the eager loop differs from the plain one in one way the captured step does."""
    import trainer.train as tt
    from trainer.data import BatchLoader
    from trainer.muon import Muon

    loader_call = BatchLoader.__call__

    def contiguous(self, offsets):
        return tuple(t.contiguous() for t in loader_call(self, offsets))

    def no_cache(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    set_lr = tt.set_lr

    def tensor_lr(optimizer, factor):  # as StepGraph: capturable AdamW, every lr a 0-d device tensor
        for group in optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["capturable"] = True
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device="cuda")
        set_lr(optimizer, factor)

    def scaled_lr(scale: float):  # a deliberate bug of the kind the GPU test must catch: how far does it move?
        return lambda optimizer, factor: set_lr(optimizer, factor * scale)

    muon_init = Muon.__init__

    def ns32(self, *a, **k):
        muon_init(self, *a, **k)
        self.ns_dtype = torch.float32

    return {
        "eager": contextlib.nullcontext,
        "contiguous-batches": lambda: _patched(BatchLoader, "__call__", contiguous),
        "autocast-no-cache": lambda: _patched(tt._Run, "autocast", no_cache),
        "tensor-lr": lambda: _patched(tt, "set_lr", tensor_lr),
        "ns-float32": lambda: _patched(Muon, "__init__", ns32),
        "bug-lr-x0.8": lambda: _patched(tt, "set_lr", scaled_lr(0.8)),
        "bug-lr-x0.5": lambda: _patched(tt, "set_lr", scaled_lr(0.5)),
        "no-reduced-bf16": lambda: _patched(
            torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False
        ),
    }


EARLY_STEPS = (10, 30, 60)  # muon-eager: training-loss means over these first steps, a sharper check than the evals


def muon_eager(args: argparse.Namespace, workdir: Path, corpus: Path) -> None:
    from trainer.testing import short_run_evals

    eager = dict(compile_mode="none", step_graph=False, kernel_names="")
    ways = {name: (change, eager) for name, change in _muon_changes().items()}
    ways["graph"] = (contextlib.nullcontext, dict(eager, step_graph=True))
    ways["compiled"] = (contextlib.nullcontext, dict(eager, compile_mode="reduce-overhead"))
    chosen = args.ways.split(",") if args.ways else list(ways)
    if unknown := [w for w in chosen if w not in ways]:
        raise SystemExit(f"tools.train_probe: unknown way(s) {unknown}; choose from {list(ways)}")
    if args.threads:
        torch.set_num_threads(args.threads)  # as trainer/conftest.py does for the tests
    rows = []
    for name in chosen:
        change, changes = ways[name]
        losses: list[float] = []
        with change():
            evals = short_run_evals(corpus, workdir, "shakespeare-char-muon", name, step_losses=losses, **changes)
        early = [sum(losses[:n]) / n for n in EARLY_STEPS]  # before the learning rate's peak amplifies rounding
        rows.append((name, evals, early))
    _, base, base_early = rows[0]
    print("\n== the Muon short run (val loss at steps 40/80/120; mean training loss over the first 10/30/60 steps),")
    print("   eager loop variants against the plain eager loop")
    for name, evals, early in rows:
        print(
            f"{name:<20}",
            " ".join(f"{v:.4f}" for v in evals),
            f"max|diff| {max(abs(a - b) for a, b in zip(evals, base)):.4f}",
            "| early",
            " ".join(f"{v:.5f}" for v in early),
            f"max|diff| {max(abs(a - b) for a, b in zip(early, base_early)):.5f}",
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_probe")
    p.add_argument("what", choices=("profile", "carryover", "single", "sdpa", "muon-eager"))
    p.add_argument("--variants", default="tinylm,eager-pytorch,eager")
    p.add_argument("--sequence", default="tinylm,eager,eager-pytorch")
    p.add_argument("--variant", default="eager")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--json")
    p.add_argument("--ways", default="", help="muon-eager: which ways, comma-separated (default: all)")
    p.add_argument("--threads", type=int, default=0, help="muon-eager: torch.set_num_threads first (0: leave it)")
    p.add_argument("--backends", default="FLASH_ATTENTION,CUDNN_ATTENTION,EFFICIENT_ATTENTION")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(os.environ.get("PROBE_WORKDIR", tmp))
        corpus = resolve_corpus(os.environ.get("TINYLM_CORPUS"), workdir / "data")
        if args.what == "profile":
            profile(args, workdir, corpus)
        elif args.what == "sdpa":
            sdpa(args, workdir, corpus)
        elif args.what == "muon-eager":
            muon_eager(args, workdir, corpus)
        elif args.what == "carryover":
            carryover(args, workdir, corpus)
        else:
            r = _run(args.variant, args.steps, args.eval_interval, workdir, corpus)
            Path(args.json).write_text(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
