"""End to end on a GPU: shakespeare-char training steps (eager, bf16 autocast, fused AdamW, the preset's dropout)
with our kernels on vs off, tokens/s, printed as a table. `python -m kernels.fused_add_norm_e2e [--steps 50]`.

Rows: "off" is plain PyTorch (`use_kernels(False)`); "on, unfused" runs the kernels but the Block's plain form (each
norm its own kernel, the residual adds in PyTorch); "on": each residual add fused with the next norm. Both "on" rows force
every kernel on (`use_kernels(True)`): by default (model/layers.KERNEL_DEFAULTS) training shapes run plain PyTorch.
Random tokens (throughput does not depend on the text). The first steps of each variant are warm-up (Triton
compiles and autotunes there); the variants alternate over `--rounds` and each keeps its best round.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from unittest import mock

import torch

from model import layers, transformer
from model.presets import get_preset
from model.transformer import GPT

VARIANTS = ("off", "on, unfused", "on")


def _scope(variant: str):
    """The context a variant's steps run in."""
    if variant == "off":
        return layers.use_kernels(False)
    scope = contextlib.ExitStack()
    scope.enter_context(layers.use_kernels(True))
    if variant == "on, unfused":  # kernels on, but GPT.forward takes the Block's plain form
        scope.enter_context(mock.patch.object(transformer, "kernels_apply", lambda t: False))
    return scope


def tokens_per_s(model: GPT, opt: torch.optim.Optimizer, batch: torch.Tensor, variant: str, steps: int) -> float:
    """Time `steps` training steps on one fixed batch (B, T + 1); returns tokens per second."""
    idx, targets = batch[:, :-1], batch[:, 1:]
    with _scope(variant):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
    return steps * idx.numel() / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.fused_add_norm_e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare-char")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per variant before the rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.fused_add_norm_e2e needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    config = get_preset(args.preset, vocab_size=65) if args.preset == "shakespeare-char" else get_preset(args.preset)
    model = GPT(config).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = torch.randint(0, config.vocab_size, (args.batch, config.block_size + 1), device="cuda")
    for variant in VARIANTS:
        tokens_per_s(model, opt, batch, variant, args.warmup)
    best = dict.fromkeys(VARIANTS, 0.0)
    for _ in range(args.rounds):
        for variant in VARIANTS:
            best[variant] = max(best[variant], tokens_per_s(model, opt, batch, variant, args.steps))
    shape = f"{args.preset}, B{args.batch} T{config.block_size}, bf16 autocast, eager"
    print(f"\n{torch.cuda.get_device_name()}: {shape}, best of {args.rounds} x {args.steps} steps")
    print(f"| kernels | tokens/s | vs off |\n| --- | --- | --- |")
    for variant in VARIANTS:
        print(f"| {variant} | {best[variant]:,.0f} | {best[variant] / best['off']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
