"""Exact resume: model, optimizer, grad scaler, step, RNG states and data position, in a folder beside the checkpoint.

Tensors go to safetensors and everything else to JSON (never pickle). The folder is written whole under a
temporary name and swapped into place, so a crash mid-save leaves the previous resume state intact.

    <run_dir>/resume/
        model.safetensors       weights (tied tensors stored once)
        optimizer.safetensors   per-parameter state, keys "<param index>.<name>" (exp_avg, exp_avg_sq, step)
        rng.safetensors         torch CPU (and CUDA) generator states, keys "<rank>.cpu", "<rank>.cuda"
        extra.safetensors       the loop's own tensors, when it has any (the weights' moving average)
        state.json              step, best loss, sampler state, python/numpy RNG per rank, optimizer groups, ...
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = [
    "capture_rng",
    "restore_rng",
    "save_resume_state",
    "load_resume_state",
    "load_extra_tensors",
    "has_resume_state",
]

_FOLDER = "resume"


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's torch (CPU and current CUDA), python and numpy-global RNG states."""
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.dim() == 0:  # a learning rate kept on the device (trainer.step_graph)
        return obj.item()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def has_resume_state(run_dir: Path) -> bool:
    return (Path(run_dir) / _FOLDER / "state.json").is_file()


def save_resume_state(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: dict[str, Any],
    rng_per_rank: list[dict[str, Any]],
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the resume folder atomically; `state` is JSON-able (step, sampler state, ...), `extra` more tensors
    (load_extra_tensors reads them back). Rank 0 calls this."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}.", dir=run_dir))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors = {}
        rng_json = []
        for rank, rng in enumerate(rng_per_rank):
            rng_tensors[f"{rank}.cpu"] = rng["cpu"].contiguous()
            if rng.get("cuda") is not None:
                rng_tensors[f"{rank}.cuda"] = rng["cuda"].cpu().contiguous()
            rng_json.append({"python": rng["python"], "numpy": rng["numpy"]})
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        if extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
        doc = dict(state, optimizer=opt_json, scaler=_jsonable(scaler.state_dict()), rng=rng_json)
        (tmp / "state.json").write_text(json.dumps(doc))
        _swap_in(tmp, run_dir / _FOLDER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_dir / _FOLDER


def _swap_in(new: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (flat tensors for safetensors, the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in doc["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_resume_state(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    rank: int,
    device: torch.device,
) -> dict[str, Any]:
    """Load weights, optimizer and scaler in place, restore this rank's RNG; returns the JSON `state`."""
    folder = Path(run_dir) / _FOLDER
    doc = json.loads((folder / "state.json").read_text())
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
    assert not missing and not unexpected, (missing, unexpected)
    optimizer.load_state_dict(_join_optimizer(load_file(str(folder / "optimizer.safetensors")), doc["optimizer"]))
    if doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    rng_tensors = load_file(str(folder / "rng.safetensors"))
    if rank < len(doc["rng"]):
        rng = dict(doc["rng"][rank], cpu=rng_tensors[f"{rank}.cpu"], cuda=rng_tensors.get(f"{rank}.cuda"))
        restore_rng(rng, device)
    return doc


def load_extra_tensors(run_dir: Path, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The `extra` tensors of the resume state (None when it was saved without them)."""
    file = Path(run_dir) / _FOLDER / "extra.safetensors"
    return load_file(str(file), device=str(device)) if file.is_file() else None
