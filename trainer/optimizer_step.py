"""Gradient clipping and the optimizer step as compiled code (PyTorch's "compiling the optimizer" recipe).

Under torch.compile with CUDA graphs the forward and backward replay as graphs, but `clip_grad_norm_` and the
optimizer's step ran eagerly between them: their Python (param-group loops, state lookups, the multi-tensor
launches) cost ~0.6 ms of a 6.6 ms step on an H200 (trainer/PERF_NOTES.md). `CompiledOptimizerStep` compiles
clip + step into Inductor kernels (AdamW's foreach ops fuse into a few horizontal kernels), replayed as CUDA graphs
too under mode="reduce-overhead". What the recipe needs, done by `prepare_optimizer`:
- each group's learning rate is a 0-d device tensor, so a schedule changes a value, not a constant baked into the
  graph (a float lr would recompile every step); `set_lr` fills it;
- on a GPU, AdamW runs `capturable` (its step counters on the device: no host read inside the graph), with the
  foreach implementation that Inductor traces (the `fused` kernel is one opaque op it cannot fuse or capture).
torch.optim's `step()` ends its traced region on purpose (a graph break around the no-grad step, so AOT autograd sees
an inference graph), so the clip and the step are two compiled graphs; Muon (trainer.muon) compiles the same way,
inside MuonAdamW.step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from trainer.muon import Muon

__all__ = ["CompiledOptimizerStep", "prepare_optimizer", "set_lr"]

log = logging.getLogger(__name__)


def prepare_optimizer(optimizer: Any, device: torch.device) -> None:
    """Make `optimizer` (torch.optim.Optimizer or trainer.muon.MuonAdamW) compile without recompiling: a device
    tensor lr per group; on CUDA, capturable AdamW on foreach kernels, its step counters on the device; Muon's momentum
    buffers created up front. Call it after a resume too: loading a state dict brings back the saved groups'
    settings."""
    cuda = device.type == "cuda"
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr) if not isinstance(lr, torch.Tensor) else float(lr.item())
        group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)
        if "fused" in group:  # AdamW's groups (Muon has no such keys)
            group["fused"] = False
            group["foreach"] = cuda  # a tensor lr needs capturable with foreach; on a CPU, the per-tensor loop
            group["capturable"] = cuda
    for part in getattr(optimizer, "optimizers", (optimizer,)):  # MuonAdamW's two, or the optimizer itself
        if isinstance(part, Muon):
            part.init_state()
    # Static addresses: CUDA-graph trees then replay the step in place on these tensors rather than copy them in (lr)
    # or refuse to graph a step that writes into them (Muon's momentum buffers; dynamo marks torch.optim's own state
    # when it creates it, but not that of an optimizer without torch.optim's _init_group).
    for group in optimizer.param_groups:
        torch._dynamo.mark_static_address(group["lr"])
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                torch._dynamo.mark_static_address(value)
    if cuda:
        for p, state in optimizer.state.items():
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                state["step"] = step.to(device=p.device, dtype=torch.float32)


def set_lr(optimizer: Any, factor: float) -> None:
    """Every group's learning rate to its base_lr times `factor`; a tensor lr is filled in place (on a GPU that is
    one small kernel per group, no host sync, and the compiled step reads the new value)."""
    for group in optimizer.param_groups:
        value = group["base_lr"] * factor
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


class CompiledOptimizerStep:
    """`step()` clips the gradients of `params` to `max_norm` (math.inf: no clipping), steps `optimizer` and returns
    the norm before clipping, a () device tensor; compiled with `compile_fn` (torch.compile with the run's mode)."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        optimizer: Any,
        max_norm: float,
        compile_fn: Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]],
    ) -> None:
        self.params, self.optimizer, self.max_norm = params, optimizer, max_norm
        self._compiled = compile_fn(self._clip_and_step)

    def _clip_and_step(self) -> torch.Tensor:
        """clip_grad_norm_'s arithmetic, but the clipped gradients are new tensors: CUDA-graph trees replay a graph
        that writes into its inputs only when those are static (parameters, optimizer state) or outputs of an
        earlier graph, and the gradients of layers that run eagerly (embedding and head under compile_scope=blocks)
        are neither: an in-place scale would make the graph run without CUDA graphs."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)  # the norm before clipping
        if not math.isinf(self.max_norm):
            coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            for p, g in zip(params, torch._foreach_mul(grads, coef)):
                p.grad = g
        self.optimizer.step()
        return norm

    def release(self) -> None:
        """Drop dynamo's compiled entries for the optimizer's step (call when the run ends). They guard on the
        optimizer object's identity, and the code they hang on (torch.optim's step wrapper, AdamW.step, Muon.step) is
        shared by every optimizer in the process: without this a worker's fifth run (fourth with Muon) would hit
        dynamo's recompile limit and step eagerly from then on. The clip's graph guards on shapes, not identity, and is
        kept for the next run."""
        stack = []
        for part in getattr(self.optimizer, "optimizers", (self.optimizer,)):
            fn = type(part).step
            while fn is not None:  # the step and every decorator around it (each compiled as its own frame)
                if hasattr(fn, "__code__"):
                    stack.append(fn.__code__)
                fn = getattr(fn, "__wrapped__", None)
        _reset_codes(stack)

    def step(self) -> torch.Tensor:
        # detached and cloned: under CUDA graphs the returned norm lives in the graph's output buffer, which the
        # next replay overwrites before the loop reads this one at its log point
        try:
            return self._compiled().detach().clone()
        except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. InductorError: step eagerly from now on
            # (H200, torch 2.11: Muon's step fails in Inductor's scheduler, an AssertionError in loop reordering)
            if self._compiled == self._clip_and_step:
                raise
            log.warning("the optimizer step did not compile (%s); it runs eagerly for the rest of this run", err)
            self._compiled = self._clip_and_step
            return self._compiled().detach().clone()


def _reset_codes(codes: list[Any]) -> None:
    """torch._dynamo.reset_code on each code object and on the resume functions dynamo generated from it (the code
    after a graph break runs as a function of its own, with its own compiled entries)."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache
    except ImportError:  # a torch without it: the entries stay (a long-lived process may reach the recompile limit)
        return
    seen: set[int] = set()
    while codes:
        code = codes.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        torch._dynamo.reset_code(code)
        if code in ContinueExecutionCache.cache:
            codes.extend(ContinueExecutionCache.cache[code].values())
