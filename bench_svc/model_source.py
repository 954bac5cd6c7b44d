"""The model an in-process suite measures: the run's artifact, or a random-init preset when none is given.

Speed and memory do not depend on the weights' values, so a random-init preset gives the same figures as a
trained model of that shape; the label says which one it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench_svc.suite import SuiteContext
from model.artifact import ArtifactStore, load_artifact
from model.config import ModelConfig
from model.presets import get_preset
from model.transformer import GPT

__all__ = ["BenchModel", "load_bench_model", "resolve_model"]


@dataclass(frozen=True)
class BenchModel:
    model: GPT  # in eval mode, dropout off, on the run's device
    config: ModelConfig
    label: str  # "artifact <id> (<preset>)" or "random-init preset <name>"


def resolve_model(store_root: Path, ref: str) -> Path:
    """The artifact folder `ref` names: a folder path holding a manifest, else an id prefix or name in the store;
    empty means the newest artifact.

    Raises model.artifact.ArtifactNotFound (the message lists what the store holds)."""
    if not ref:
        return ArtifactStore(store_root).newest().path
    as_path = Path(ref).expanduser()
    try:
        is_folder = (as_path / "manifest.json").is_file()
    except (OSError, ValueError):  # a name too long for a path, a NUL byte: not a folder, so an id or a name
        is_folder = False
    if is_folder:
        return as_path.resolve()
    return ArtifactStore(store_root).resolve(ref)


def load_bench_model(ctx: SuiteContext, seed: int = 0) -> BenchModel:
    """The artifact at `ctx.model_path`, else `ctx.preset` initialised from `seed`, with dropout off."""
    if ctx.model_path is not None:
        artifact = load_artifact(ctx.model_path, device=ctx.device)
        model = artifact.model.eval()
        return BenchModel(
            model, artifact.config, f"artifact {artifact.manifest['id']} ({artifact.manifest.get('preset', '?')})"
        )
    config = get_preset(ctx.preset, dropout=0.0)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT(config).to(ctx.device).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    return BenchModel(model, config, f"random-init preset {ctx.preset}")
