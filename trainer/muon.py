"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for the hidden 2-D matrices of a transformer.

The recipe of Keller Jordan's modded-nanogpt (written anew here): keep a Nesterov momentum of each matrix's
gradient, replace it by the nearest (semi-)orthogonal matrix, U V^T of its SVD, approximated by 5 steps of a quintic
Newton-Schulz iteration in bfloat16, and step along that, scaled by sqrt(max(1, rows / cols)). Every direction of the
update then moves by about the same amount, which lets a much larger learning rate train stably. Embeddings, the LM
head, norms and biases are not hidden matrices: `MuonAdamW` steps them with AdamW beside Muon, as one optimizer.

Matrices of one shape (after turning tall ones on their side) are orthogonalised as one batch: this model has two
such shapes, so a step is ~2 x 15 batched matmuls rather than one small launch per matrix and iteration.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["NS_COEFFS", "newton_schulz", "Muon", "MuonAdamW", "is_hidden_matrix"]

# Quintic coefficients (a, b, c) chosen in modded-nanogpt to push singular values toward 1 fast from any start in
# (0, 1]: after 5 steps they lie in about [0.7, 1.2], not exactly 1; that is as good for training and much cheaper.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise g (..., m, n): U V^T of its SVD, computed (and returned) in `dtype`."""
    assert g.dim() >= 2, f"newton_schulz needs a matrix or a batch of them, got shape {tuple(g.shape)}"
    a, b, c = NS_COEFFS
    x = g.to(dtype).reshape(-1, *g.shape[-2:])  # (k, m, n)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # (k, n, m): iterate on the short side, X X^T is the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):  # three kernels a step: G = X X^T, P = b G + c G G, X = a X + P X
        gram = torch.bmm(x, x.mT)  # (k, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return (x.mT if tall else x).reshape(g.shape)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Whether Muon steps parameter `name`: a 2-D weight inside the transformer blocks (not an embedding or head)."""
    return p.dim() == 2 and name.startswith("blocks.")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Per group: lr, momentum (0.95), nesterov (True), ns_steps (5), weight_decay
    (decoupled, 0 by default). `lr` may be a float or a 0-d device tensor (read on the device under CUDA-graph
    capture, as trainer.step_graph sets it). `ns_dtype`: the iteration's precision (bfloat16; float32 for tests)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon steps 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every matrix's (zero) momentum buffer now rather than at the first step, so a compiled step traces
        the steady state once instead of a first step and then the steady one (trainer.optimizer_step)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        beta = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1.0 - beta)  # buf = beta * buf + (1 - beta) * g
        updates = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs
        orthogonal = _orthogonalise(updates, group["ns_steps"], self.ns_dtype, params[0].dtype)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            decay = 1.0 - lr * wd
            torch._foreach_mul_(params, decay)
        # step = -lr * sqrt(max(1, rows / cols)) * O
        steps = orthogonal
        torch._foreach_mul_(steps, [-(max(1.0, p.size(0) / p.size(1)) ** 0.5) for p in params])
        if isinstance(lr, torch.Tensor):
            torch._foreach_mul_(steps, lr)
            torch._foreach_add_(params, steps)
        else:
            torch._foreach_add_(params, steps, alpha=lr)


def _orthogonalise(
    mats: list[torch.Tensor], steps: int, ns_dtype: torch.dtype, dtype: torch.dtype
) -> list[torch.Tensor]:
    """newton_schulz of each matrix (in ns_dtype, returned as `dtype`), batched over the matrices of one (wide-side)
    shape."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        by_shape[(min(m.shape), max(m.shape))].append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for index in by_shape.values():
        wide = torch.stack([mats[i].mT if mats[i].size(0) > mats[i].size(1) else mats[i] for i in index])  # (k, m, n)
        ortho = newton_schulz(wide, steps, dtype=ns_dtype).to(dtype)  # (k, m, n), one cast for the batch
        for j, i in enumerate(index):
            out[i] = ortho[j].mT if mats[i].size(0) > mats[i].size(1) else ortho[j]
    return out  # type: ignore[return-value]


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for everything else, stepped, zeroed and saved as one optimizer.

    `param_groups` lists AdamW's groups, then Muon's; `state_dict()` numbers the parameters the same way across the
    two (AdamW's first), in torch.optim's layout, so trainer.resume_state saves and restores it unchanged.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon) -> None:
        self.optimizers = (adamw, muon)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "MuonAdamW.step takes no closure"
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [dict(g, params=[offset + i for i in g["params"]]) for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        for opt in self.optimizers:
            mine, groups = groups[: len(opt.param_groups)], groups[len(opt.param_groups) :]
            count = sum(len(g["params"]) for g in opt.param_groups)
            state = {int(i) - offset: s for i, s in state_dict["state"].items() if offset <= int(i) < offset + count}
            shifted = [dict(g, params=[int(i) - offset for i in g["params"]]) for g in mine]
            opt.load_state_dict({"state": state, "param_groups": shifted})
            offset += count
        if groups:
            raise ValueError(f"optimizer state has {len(groups)} more parameter group(s) than this optimizer")
