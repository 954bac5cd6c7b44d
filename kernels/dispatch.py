"""Which implementation a kernel wrapper runs: the fast Triton kernel, or the PyTorch reference.

"auto" takes Triton when every tensor is on a CUDA device and the reference otherwise (CPU training, tests).
"triton" forces the kernel, which on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1, set by
kernels/conftest.py before triton is imported); "reference" forces the plain PyTorch version.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

__all__ = ["IMPLS", "Impl", "num_sms", "option_impl", "repeat_rows", "split_tickets", "use_triton"]

Impl = Literal["auto", "triton", "reference"]
IMPLS: tuple[str, ...] = ("auto", "triton", "reference")


def use_triton(impl: Impl, *tensors: torch.Tensor, supported: bool = True) -> bool:
    """True when the wrapper should launch its Triton kernel for these tensors.

    `supported` says whether the kernel handles these inputs (dtype, head dim, ...): "auto" then falls back,
    "triton" raises.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if impl == "triton":
        if not supported:
            raise ValueError("impl='triton' but the Triton kernel does not support these inputs (see its docstring)")
        return True
    return supported and all(t.is_cuda for t in tensors)


def option_impl(name: str, option: bool | str | None) -> str | None:
    """A caller's on/off switch for a kernel path as an `impl`: False / None -> None (off), True -> "auto", else one
    of IMPLS (a ValueError naming the option `name` otherwise)."""
    if option is False or option is None:
        return None
    impl = "auto" if option is True else option
    if impl not in IMPLS:
        raise ValueError(f"{name} must be False, True or one of {IMPLS}, got {option!r}")
    return impl


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (for persistent grids); a small fixed number on CPU."""
    if device.type != "cuda":
        return 4  # the interpreter runs programs one after another: fewer programs, fewer partial sums
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


SPLIT_TICKETS = 8192  # per device: the most (output tile or row/head) tickets one split launch takes
_TICKETS: dict[torch.device, torch.Tensor] = {}  # per device, created by the first launch (outside a graph)


def split_tickets(device: torch.device, owner: str) -> torch.Tensor:
    """The int32 tickets of the split kernels (wo_matmul's split-K, decode attention's split keys) on `device`, all 0
    between launches: the last program of a split unit to take its ticket merges the partials and resets it. One
    buffer per device, like cuBLAS's workspace: split launches on one stream run one after another."""
    tickets = _TICKETS.get(device)
    if tickets is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner}: call it once outside CUDA graph capture first (it allocates its tickets)")
        tickets = _TICKETS[device] = torch.zeros(SPLIT_TICKETS, dtype=torch.int32, device=device)
    return tickets


def repeat_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Each row of t (B, ...) n times in a row: (B * n, ...), contiguous, without a host sync (capturable). Not a
    view: for one row, expand + reshape gives a stride-0 view of t, which a kernel reading row i at [i] reads past (the
    speculative verify's decode attention read slots beyond a 1-row buffer so, at batch 1)."""
    return t[:, None].expand(t.shape[0], n, *t.shape[1:]).reshape(-1, *t.shape[1:]).contiguous()
