"""What one kernel benchmark case is: the declaration every `*_bench.py` beside a kernel returns from
`bench_cases() -> list[BenchCase]` (our kernel and the best PyTorch alternatives at the same shape: same `kernel`
and `shape`, `ours=False`), and the helpers that build a case's call.

The kernels package only declares its cases (as the Triton tutorials keep a kernel's benchmark beside it); timing,
ceilings, the summary and the result files belong to the harness, `bench_svc/benches/kernels.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

__all__ = ["BenchCase", "eager_and_compiled", "forward_call", "graph_twins"]


@dataclass(frozen=True)
class BenchCase:
    """One thing to time: `setup()` allocates its inputs on the GPU and returns the call to time."""

    kernel: str  # what is measured, e.g. "flash_attention fwd+bwd"
    shape: str  # e.g. "B64 H6 T256 D64 bf16"
    impl: str  # e.g. "triton", "sdpa", "torch.compile"
    ours: bool  # our kernel (True) or a PyTorch alternative (False)
    setup: Callable[[], Callable[[], object]]
    flops: float = 0.0  # floating-point operations per call; > 0 means compared with the matmul ceiling
    bytes_moved: float = 0.0  # minimal bytes read + written per call; compared with the copy ceiling
    measure_memory: bool = False  # also record the peak memory one call allocates above its inputs
    graph_calls: int = 0  # > 0: timed as this many calls captured in one CUDA graph, replayed (decode-time kernels)

    def __post_init__(self) -> None:
        for name in ("kernel", "shape", "impl"):
            if not getattr(self, name):
                raise ValueError(f"BenchCase.{name} must be a non-empty string")
        if self.graph_calls < 0:
            raise ValueError(f"BenchCase.graph_calls must be >= 0, got {self.graph_calls}")
        if self.flops < 0 or self.bytes_moved < 0:
            raise ValueError(f"BenchCase flops and bytes_moved must be >= 0, got {self.flops}, {self.bytes_moved}")


def forward_call(fn: Callable[..., object], inputs: tuple[torch.Tensor, ...], backward: bool) -> Callable[[], object]:
    """The call to time: `fn(*inputs)` without autograd, or forward + backward.

    The backward is taken with respect to the inputs that require grad, against fixed random output gradients,
    through torch.autograd.grad (nothing accumulates into .grad between timed calls).
    """
    if not backward:

        def run_forward() -> object:
            with torch.no_grad():
                return fn(*inputs)

        return run_forward
    first = fn(*inputs)
    outputs = first if isinstance(first, tuple) else (first,)
    grads = tuple(torch.randn_like(o) for o in outputs)
    wrt = tuple(t for t in inputs if t.requires_grad)
    del first, outputs

    def run_forward_backward() -> object:
        out = fn(*inputs)
        return torch.autograd.grad(out if isinstance(out, tuple) else (out,), wrt, grads)

    return run_forward_backward


def eager_and_compiled(eager_fn: Callable[..., object]) -> dict[str, Callable[[], Callable[..., object]]]:
    """The usual PyTorch alternatives of a fused kernel: the eager code, and torch.compile of it (which fuses too).

    Values are factories, called in a case's setup, so each case compiles its own function for its own shape.
    """
    return {
        "eager": lambda: eager_fn,
        "torch.compile": lambda: torch.compile(eager_fn, dynamic=False),
    }


TRAINING_GRAPH_CALLS = 4  # calls per captured graph for the graph-timed twins of training-shape cases


def graph_twins(cases: list[BenchCase], calls: int = TRAINING_GRAPH_CALLS) -> list[BenchCase]:
    """The same cases timed inside a CUDA graph (shape suffixed " graph"), as the compiled trainer
    (`compile_mode=reduce-overhead`) runs them: no host launch cost, so the row compares the kernels' device time
    alone. Ours and the alternatives of a shape get twins alike, so each twin row carries its own speed-up."""
    return [replace(c, shape=f"{c.shape} graph", graph_calls=calls) for c in cases]
