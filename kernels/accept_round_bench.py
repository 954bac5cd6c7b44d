"""Benchmark of a sampled speculative round's acceptance: the PyTorch chain (`accept_round_reference`: `probabilities`
over the b * (k + 1) verify rows, `accept_sampled`, the context mask) against the one-launch kernel.

`python -m kernels.accept_round_bench --count` (any machine) counts, per (b, k, V, setting), the aten ops each path
sends to the backend that are neither views nor bare allocations: on a GPU each launches at least one kernel (a
lower bound: a sort can take several). On a GPU, `python -m kernels.accept_round_bench` adds what a replay really
launches (torch.profiler over one call captured in a CUDA graph), ms per call (`time_graph_ms`: CALLS calls in one
graph, replayed, as the round graph runs it) and how many rows' counts and tokens agree.

Settings: "serve" (temperature 0.8, top-k 50, top-p 0.95; repetition penalty 1.1 on half the rows, 10% of the ids
seen), "plain" (temperature 1 only, no penalty row: the round graph without the penalty's ops).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_svc.benches.kernel_timing import time_graph_ms
from kernels import accept_round as ar
from tools.profiling import graph_kernels

__all__ = ["backend_ops", "main"]

BATCHES = (1, 16)
KS = (2, 4)
VOCABS = (65, 256)
SETTINGS = ("serve", "plain")
CALLS = 20  # calls per captured graph
LOGIT_SCALE = 3.0  # logits ~ N(0, 3^2): a spread like a trained model's
# Ops that reach the backend without launching a kernel: allocations (views are told by their schema)
_NO_LAUNCH = ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::lift_fresh")


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name not in _NO_LAUNCH:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def backend_ops(fn: Callable[[], object]) -> list[str]:
    """The aten ops one call of fn sends to the backend that launch work on a GPU (not views, not allocations); a
    Triton launch of the accept-round kernel is listed as "triton::accept_round" (it is not run: any device)."""
    log = _OpLog()

    class _Launch:  # the kernel's launch, recorded
        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.ops.append("triton::accept_round")

    with mock.patch.object(ar, "_accept_round_kernel", _Launch()), log:
        fn()
    return log.ops


def _inputs(b: int, k: int, V: int, setting: str, gen: torch.Generator, device: str) -> tuple[list, dict]:
    """A round's tensors as `_round_step` hands them over: (logits, drafts, q, u_accept, u_new) and the settings."""
    logits = LOGIT_SCALE * torch.randn(b, k + 1, V, generator=gen)
    q = torch.softmax(logits[:, :k] + torch.randn(b, k, V, generator=gen), dim=-1)
    drafts = ar.inverse_cdf(q.flatten(0, 1), torch.rand(b * k, generator=gen)).view(b, k)
    u = torch.rand(b, 3 * k + 1, generator=gen)  # as round_uniforms: the accept tests' and the new token's are views
    serve = setting == "serve"
    kw = dict(
        greedy=torch.zeros(b, dtype=torch.bool),
        temperature=torch.full((b, 1), 0.8 if serve else 1.0),
        top_k=torch.full((b, 1), 50 if serve else V),
        top_p=torch.full((b, 1), 0.95 if serve else 1.0),
        seen=(torch.rand(b, V, generator=gen) < 0.1) if serve else None,
        penalty=torch.where(torch.arange(b) % 2 == 0, 1.1, 1.0)[:, None] if serve else None,
    )
    u = u.to(device)
    args = [t.to(device) for t in (logits, drafts, q)] + [u[:, k : 2 * k], u[:, 2 * k :]]
    return args, {name: None if t is None else t.to(device) for name, t in kw.items()}


def _row(b: int, k: int, V: int, setting: str, gen: torch.Generator, gpu: bool) -> str:
    args, kw = _inputs(b, k, V, setting, gen, "cuda" if gpu else "cpu")
    calls = {impl: (lambda impl=impl: ar.accept_round(*args, **kw, impl=impl)) for impl in ("reference", "triton")}
    ops = {impl: len(backend_ops(fn)) for impl, fn in calls.items()}
    line = f"{b:>3} {k:>2} {V:>6} {setting:>6} | {ops['reference']:>6} {ops['triton']:>6}"
    if not gpu:
        return line
    want, got = calls["reference"](), calls["triton"]()  # the first kernel call compiles, outside any capture
    agree = int(((want[0] == got[0]) & (want[1] == got[1]).all(dim=1)).sum())
    kernels = {impl: graph_kernels(fn) for impl, fn in calls.items()}
    ms = {impl: time_graph_ms(fn, CALLS) for impl, fn in calls.items()}
    return (
        line + f" | {kernels['reference']:>6} {ms['reference']:>8.4f} | {kernels['triton']:>6} {ms['triton']:>8.4f} |"
        f" {ms['reference'] / ms['triton']:>7.2f}x {agree:>3}/{b}"
    )


def _settings(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown} not among {SETTINGS}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", action="store_true", help="op counts only (no GPU needed)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated b values")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated k values")
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="comma-separated V values")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), type=_settings, help=f"comma-separated, of {SETTINGS}"
    )
    args = parser.parse_args(argv)
    gpu = not args.count
    if gpu and not torch.cuda.is_available():
        raise SystemExit("kernels.accept_round_bench needs a CUDA GPU (or --count)")
    settings = args.settings
    gen = torch.Generator().manual_seed(0)
    device = torch.cuda.get_device_name() if gpu else "CPU (op counts only)"
    print(f"# {device}, torch {torch.__version__}" + (f", {CALLS} calls per CUDA graph" if gpu else ""))
    head = f"{'b':>3} {'k':>2} {'V':>6} {'set':>6} | {'ops':>6} {'ops':>6}"
    print(head + (" | torch k torch ms | triton k triton ms | speed-up agree" if gpu else "  (torch, kernel)"))
    for V in (int(v) for v in args.vocabs.split(",")):
        for k in (int(x) for x in args.ks.split(",")):
            for b in (int(x) for x in args.batches.split(",")):
                for setting in settings:
                    print(_row(b, k, V, setting, gen, gpu), flush=True)


if __name__ == "__main__":
    main()
