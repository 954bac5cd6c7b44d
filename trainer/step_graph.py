"""The whole training step as one CUDA graph: forward, backward, gradient clipping and AdamW, replayed every step.

This model's step is a few hundred small kernels (GPU-busy 6.1 ms at nanoGPT's batch on an H200), so launching
them from Python is what costs: eager PyTorch ran 26.6 ms per step, torch.compile 15.2 ms. Captured once, a step is
one `replay()`: no Python per kernel, and no compilation at start-up. PyTorch's whole-network capture recipe
(docs: "CUDA Graphs", whole network capture): a few warm-up steps on a side stream (lazy initialisations: cuBLAS
workspaces, the optimizer's state), then the step is captured with static inputs; each replay reads the batch copied
into them, draws fresh dropout masks (the default generator is graph-safe: every replay advances its offset) and
reads the learning rate from a device tensor (AdamW with `capturable=True`).

The model may be torch.compile'd without CUDA graphs of its own (compile_mode default): the warm-up steps compile it,
and the capture then records Inductor's fused kernels with the optimizer's, so a step is still one replay but runs
the compiled step's kernels: 6.58 ms per step on an H200 (2.49M tokens/s at nanoGPT's batch; 2.88M with the fused
add + norm), against 9.0 ms with the eager model and 6.6-7.3 ms (host-bound) for reduce-overhead's CUDA-graph trees
(trainer/PERF_NOTES.md section 13). reduce-overhead cannot be captured again (its own CUDA graphs), so
`step_graph_problems` names it.

What a captured step cannot change between replays, and so `step_graph_problems` names (an error with
step_graph=true, the plain loop with auto): dropout annealing (p is baked
into the kernels), gradient accumulation or DDP (one graph per micro-step and the all-reduce), fp16's loss scaling
(the scaler decides on the host), gradient checkpointing (it saves and restores RNG state on the host).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["GRAPH_COMPILE_MODES", "WARMUP_STEPS", "StepGraph", "step_graph_problems"]

WARMUP_STEPS = 3  # eager steps on a side stream before capture
GRAPH_COMPILE_MODES = ("none", "default")  # compile modes without CUDA graphs of their own (max-autotune has them)


def step_graph_problems(config: Any, device: torch.device, world_size: int, accum: int) -> list[str]:
    """What rules a captured step out for this run, each naming its setting (empty: it can be captured)."""
    problems = []
    if device.type != "cuda":
        problems.append(f"device must be a CUDA GPU, got {device}")
    if config.anneals_dropout:
        problems.append("dropout_start must be unset (annealed dropout changes the captured kernels)")
    if world_size > 1 or accum > 1:
        problems.append(f"grad_accum must be 1 on one process, got {accum} micro-steps on {world_size} ranks")
    if config.dtype == "float16":
        problems.append("dtype must be bfloat16 or float32 (float16's loss scaling runs on the host)")
    if config.grad_checkpointing:
        problems.append("grad_checkpointing must be false")
    if config.compile_mode not in GRAPH_COMPILE_MODES:
        problems.append(
            f"compile_mode must be one of {', '.join(GRAPH_COMPILE_MODES)} (the step is captured whole; "
            f"{config.compile_mode} records CUDA graphs of its own), got {config.compile_mode}"
        )
    return problems


class StepGraph:
    """One optimizer step of `model` (already built, on the GPU) captured as a CUDA graph.

    `step(x, y, lr_factor)` runs one step on the batch x, y (B, T), each group's learning rate its `base_lr` times
    lr_factor (trainer.train.set_lr), and returns (loss, grad norm before clipping), fresh
    device tensors the next step does not overwrite. `forward(x, y) -> (logits, loss)` is what the step calls: `model`
    itself (the default) or its torch.compile'd wrapper; `after_step()`, device work captured after the optimizer's
    (the weights' moving average). The first WARMUP_STEPS calls run eagerly on a side stream,
    the next one captures the graph and replays it, every later one only replays.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,  # torch.optim.Optimizer or trainer.muon.MuonAdamW
        autocast_dtype: torch.dtype | None,
        max_norm: float,
        forward: Callable[[torch.Tensor, torch.Tensor], tuple[Any, torch.Tensor]] | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.optimizer, self.max_norm = model, optimizer, max_norm
        self.forward = model if forward is None else forward
        self.after_step = after_step
        self.autocast_dtype = autocast_dtype
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        device = next(model.parameters()).device
        # The learning rate is read on the device by the captured AdamW (and Muon, which accepts a tensor lr).
        for group in optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        self.static: dict[str, torch.Tensor] = {}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: a cast cached during capture would be replayed stale
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            _, loss = self.forward(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()
        return loss.detach(), norm.detach()

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(group["base_lr"] * lr_factor)
        self.calls += 1
        if not self.static:  # contiguous, as the captured step reads them: the warm-up steps see the same layout
            self.static = {"x": torch.empty_like(x, memory_format=torch.contiguous_format),
                           "y": torch.empty_like(y, memory_format=torch.contiguous_format)}  # fmt: skip
        self.static["x"].copy_(x)  # a batch comes as views of one (B, T + 1) tensor: strides (T + 1, 1)
        self.static["y"].copy_(y)
        if self.calls <= WARMUP_STEPS:
            return self._eager(self.static["x"], self.static["y"])
        if self.graph is None:  # the warm-up steps compiled the model (if compiled) for exactly these inputs
            self._capture()
        self.graph.replay()
        return self.static["loss"].clone(), self.static["norm"].clone()

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss, norm = self._body(x, y)
            self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        return loss, norm

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # backward inside the graph then writes (not adds) the grads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static["loss"], self.static["norm"] = self._body(self.static["x"], self.static["y"])
        self.graph = graph
