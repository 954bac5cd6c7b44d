"""GPU diagnostics for the speculative draft's one-launch kernel (kernels.draft_steps) as the serving engine calls it.

    python -m tools.draft_probe [--vocab 65] [--block-size 128] [--k 2,4]

Random-init `tiny` draft and `shakespeare-char` target (bf16 on CUDA, through `TorchRunner` as the engine builds them):
1. `draft_steps` alone, greedy and sampled, on the draft runner's cache and scratch slot, against its reference
   (`forward_cached` step by step) on a copy of the cache: drafts equal (greedy), q within tolerance, caches equal;
2. the speculative engine with the kernel on (and with the verify on the small-batch kernels and the one-launch
   acceptance too), beside the same engine with the draft loop: the tokens of a greedy request equal.
Each part synchronises, so an illegal access is reported at its part. A diagnostic tool: it prints what it found.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from inference_svc.engine import Engine
from inference_svc.params import Request
from inference_svc.runner import TorchRunner
from kernels.draft_steps import DraftModel, draft_steps
from model.presets import get_preset
from model.sampling import SamplingParams
from model.tokenizers import CharTokenizer
from model.transformer import GPT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(vocab: int, block_size: int, device: torch.device) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    target = GPT(get_preset("shakespeare-char", vocab_size=vocab, block_size=block_size, dropout=0.0)).to(device)
    draft = GPT(get_preset("tiny", vocab_size=vocab, block_size=block_size, dropout=0.0)).to(device)
    return target.eval(), draft.eval()


def _kernel_alone(draft: GPT, k: int, device: torch.device) -> str:
    runner = TorchRunner(draft, 2, device=device)
    packed = DraftModel(runner.model)
    b = 2
    slots = torch.tensor([0, runner._scratch], device=device)
    pos = torch.tensor([5, 0], device=device)
    x0 = torch.tensor([3, 7], device=device)
    for j in range(5):  # a short context in slot 0
        runner.model.forward_cached(torch.tensor([[j + 1]], device=device), runner.cache, slots[:1], pos[:1] * 0 + j)
    ref_cache = copy.deepcopy(runner.cache)
    lines = []
    for sampled in (False, True):
        args = {}
        if sampled:
            args = dict(
                greedy=torch.tensor([False, True], device=device),
                temperature=torch.full((b, 1), 0.8, device=device),
                uniforms=torch.rand(b, k, device=device),
            )
        got, q = draft_steps(packed, runner.cache, slots, pos, x0, k, span=64, impl="triton", **args)
        _sync(device)
        want, q_ref = draft_steps(packed, ref_cache, slots, pos, x0, k, span=64, impl="reference", **args)
        _sync(device)
        dq = (q - q_ref).abs().max().item() if q is not None else 0.0
        dk = (runner.cache.k[0].float() - ref_cache.k[0].float()).abs().max().item()
        lines.append(
            f"k={k} {'sampled' if sampled else 'greedy '}: drafts {got.tolist()} vs {want.tolist()}, "
            f"max |q - q_ref| {dq:.2e}, max |k - k_ref| slot 0 {dk:.2e}"
        )
    return "\n".join(lines)


def _engines(target: GPT, draft: GPT, tokenizer, k: int, device: torch.device) -> str:
    out = {}
    designs = {"loop": {}, "draft": dict(draft_kernel=True), "all": dict(draft_kernel=True, verify_kernels=True,
                                                                          accept_kernel=True)}  # fmt: skip
    for name, options in designs.items():
        engine = Engine(
            TorchRunner(target, 1, device=device),
            tokenizer,
            max_queue=1,
            draft=TorchRunner(draft, 1, device=device),
            speculative_k=k,
            resident=True,
            **options,
        )
        try:
            _sync(device)
            req = Request(prompt_ids=(1, 2, 3, 4), params=SamplingParams(max_new_tokens=24, temperature=0.0))
            out[name] = [t for chunk in engine.submit_many([req])[0] for t in chunk.token_ids]
        finally:
            engine.close()
    same = {name: tokens == out["loop"] for name, tokens in out.items()}
    return f"k={k} engine greedy: loop {out['loop']}; the same with {same}"


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.draft_probe", description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--k", default="2,4")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    target, draft = _models(args.vocab, args.block_size, device)
    tokenizer = CharTokenizer([chr(32 + i) for i in range(args.vocab)])
    for k in (int(x) for x in args.k.split(",")):
        print(_kernel_alone(draft, k, device), flush=True)
        print(_engines(target, draft, tokenizer, k, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
