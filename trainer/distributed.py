"""Which process this is in a torchrun (DDP) job, and the few collective calls the training loop needs.

`main.py` reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE into a `DistInfo`; the library never reads the
environment. World size 1 is a plain single process: nothing is initialised and every call here is a no-op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

__all__ = [
    "DistInfo",
    "SINGLE",
    "dist_from_env",
    "init_process_group",
    "destroy_process_group",
    "barrier",
    "all_mean",
    "any_true",
    "gather",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. `init_method` is how ranks meet (torchrun: env://)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    init_method: str = "env://"

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and reports progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()


def dist_from_env(env: Mapping[str, str]) -> DistInfo:
    """A DistInfo from torchrun's variables; a single process when WORLD_SIZE is absent."""
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistInfo(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", env["RANK"])), world_size=world)


def init_process_group(info: DistInfo, device: torch.device) -> None:
    """NCCL between GPUs, gloo on CPU; a no-op for one process or when already initialised."""
    if not info.enabled or torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    torch_dist.init_process_group(
        backend, init_method=info.init_method, rank=info.rank, world_size=info.world_size, **kwargs
    )


def destroy_process_group(info: DistInfo) -> None:
    """Leave the job (main.py calls it once training is over)."""
    if info.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()


def all_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over ranks (a new tensor; `value` itself is left alone)."""
    if not info.enabled:
        return value
    out = value.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / info.world_size


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when any rank says True (a cancel seen by rank 0 stops them all at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (for RNG states at checkpoint time)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(out, obj)
    return out
