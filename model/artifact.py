"""Model artifacts: a content-addressed folder per model, written atomically, verified when loaded.

    <store>/<model_id>/config.json        ModelConfig.to_dict()
                      tokenizer.json     Tokenizer.to_json()
                      model.safetensors  the state dict (a tied LM head is stored once, as tok_emb.weight)
                      manifest.json      id, name, preset, parent_id, metrics, created_at, sha256 of each file

`model_id` is the first 16 hex digits of sha256 over the three content files' hashes, so saving the same
model twice gives the same id (the second save keeps the first's manifest). Anything else in the folder
(onnx/, coreml/, hf/, parity.json, added later by the exporter) is neither hashed nor read here.
Weights are safetensors only: a pickle (.pt/.pth/.bin/.pkl/.ckpt) is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.tokenizers import Tokenizer, tokenizer_from_json
from model.transformer import GPT

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactNotFound",
    "ArtifactInfo",
    "ArtifactStore",
    "save_artifact",
    "load_artifact",
    "verify_artifact",
    "check_tokenizer_fits",
    "CONTENT_FILES",
]

log = logging.getLogger(__name__)

CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, MANIFEST_FILE = (
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "manifest.json",
)
CONTENT_FILES = (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE)  # what the id hashes
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
ID_LEN = 16
_TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class ArtifactError(Exception):
    """A model artifact is missing, malformed, tampered with, or in a refused format."""


class ArtifactNotFound(ArtifactError):
    """No artifact matches a reference (the message lists what exists)."""


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: the model (eval mode) on the requested device, and what came with it."""

    model: GPT
    tokenizer: Tokenizer
    config: ModelConfig
    manifest: dict[str, Any]
    path: Path


@dataclass(frozen=True)
class ArtifactInfo:
    """One entry of a store listing (read from its manifest, weights not loaded)."""

    id: str
    name: str
    preset: str
    created_at: str
    parent_id: str | None
    path: Path
    manifest: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_hash(file_hashes: dict[str, str]) -> str:
    """sha256 over "name sha256\\n" of each content file, in a fixed order."""
    lines = "".join(f"{name} {file_hashes[name]}\n" for name in CONTENT_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def _weights_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: contiguous CPU tensors, the tied LM head left out.

    Only a plain float GPT is accepted: its keys must be exactly those of `GPT(model.config)`.
    """
    state = model.state_dict()
    with torch.device("meta"):
        expected = GPT(model.config).state_dict()
    odd = sorted(set(state) ^ set(expected))
    if not isinstance(model, GPT) or odd:
        raise ArtifactError(
            "save_artifact takes a plain float GPT: merge LoRA adapters first (model.lora.remove_lora), and "
            f"quantize at load or export time, not before saving (unexpected/missing weights: {odd[:4]})"
        )
    if model.config.tie_weights:
        state.pop("lm_head.weight")
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_artifact(
    store_root: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    *,
    name: str,
    preset: str,
    metrics: dict[str, float] | None = None,
    parent_id: str | None = None,
) -> str:
    """Write `model` and `tokenizer` as a new artifact under `store_root` and return its id.

    Files go into a temporary folder inside the store, then one `os.rename` publishes it, so readers
    never see half an artifact.
    """
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ArtifactError(
            f"model vocab_size {model.config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    root = Path(store_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
        save_file(_weights_to_save(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        hashes = {f: _sha256(tmp / f) for f in CONTENT_FILES}
        content = _content_hash(hashes)
        model_id = content[:ID_LEN]
        manifest = {
            "format_version": FORMAT_VERSION,
            "id": model_id,
            "content_sha256": content,
            "name": name,
            "preset": preset,
            "parent_id": parent_id,
            "metrics": dict(metrics or {}),
            "num_params": model.num_params(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": hashes,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        for f in (*CONTENT_FILES, MANIFEST_FILE):
            _fsync(tmp / f)
        final = root / model_id
        if final.exists():
            log.info("artifact %s already exists in %s; keeping it", model_id, root)
        else:
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():  # lost a race to an identical save: fine; anything else: raise
                    raise
        return model_id
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _artifact_dir(path_or_dir: str | Path) -> Path:
    """The artifact folder for a folder or a file inside it; pickles are refused by name."""
    path = Path(path_or_dir)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ArtifactError(
            f"refusing to load {path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run arbitrary "
            "code; tinylm loads only safetensors artifacts (config.json, tokenizer.json, model.safetensors, manifest.json)"
        )
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ArtifactNotFound(f"artifact folder {path} does not exist")
    return path


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not (path / WEIGHTS_FILE).exists():
            raise ArtifactError(
                f"refusing to load {path}: it holds pickle weights {pickles}, not a safetensors artifact"
            )
        raise ArtifactError(f"{path} is not an artifact: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "id" not in manifest:
        raise ArtifactError(f"{manifest_path} lacks the 'id' and 'files' entries")
    return manifest


def verify_artifact(path: Path) -> dict[str, Any]:
    """Check every content file against the manifest's sha256 and the id; return the manifest."""
    manifest = _read_manifest(path)
    for f in CONTENT_FILES:
        expected = manifest["files"].get(f)
        if not (path / f).is_file():
            raise ArtifactError(f"artifact {path} is missing {f}")
        actual = _sha256(path / f)
        if actual != expected:
            raise ArtifactError(
                f"artifact {path}: {f} has sha256 {actual}, but the manifest says {expected} "
                "(the file was modified or corrupted)"
            )
    if _content_hash(manifest["files"])[:ID_LEN] != manifest["id"]:
        raise ArtifactError(f"artifact {path}: manifest id {manifest['id']} does not match its file hashes")
    return manifest


def load_artifact(path_or_dir: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Load and verify an artifact folder (or a file in it); the model comes back in eval mode."""
    path = _artifact_dir(path_or_dir)
    manifest = verify_artifact(path)
    try:
        config = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        tokenizer = tokenizer_from_json((path / TOKENIZER_FILE).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArtifactError(f"artifact {path}: {e}") from None
    check_tokenizer_fits(tokenizer, config.vocab_size, path)
    try:  # the hash only says the file is the one that was saved, not that it is valid safetensors
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except Exception as e:  # SafetensorError (truncated, empty, a pickle), OSError
        raise ArtifactError(
            f"artifact {path}: {WEIGHTS_FILE} is not a valid safetensors file ({type(e).__name__}: {e})"
        ) from None
    model = GPT(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise ArtifactError(f"artifact {path}: weights do not fit the config ({first})") from None
    if config.tie_weights:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ArtifactError(
            f"artifact {path}: weights do not fit the config (missing {missing}, unexpected {unexpected})"
        )
    model.to(device).eval()
    return Artifact(model=model, tokenizer=tokenizer, config=config, manifest=manifest, path=path)


def check_tokenizer_fits(tokenizer: Tokenizer, model_vocab_size: int, path: Path) -> None:
    """A tokenizer with more ids than the model's embedding would load, then fail every request that reaches
    an id past the embedding: refuse it at load time instead (torch and ONNX loads alike)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ArtifactError(
            f"artifact {path}: {TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's vocabulary "
            f"(config.json vocab_size) holds {model_vocab_size}; the tokenizer must not exceed the model"
        )


class ArtifactStore:
    """The artifacts under one root folder (the CLI passes $TINYLM_HOME/...; the library reads no env)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def list(self) -> list[ArtifactInfo]:
        """Every artifact with a readable manifest, oldest first (unverified: that happens on load)."""
        if not self.root.is_dir():
            return []
        infos = []
        for d in self.root.iterdir():
            if not d.is_dir() or d.name.startswith(_TMP_PREFIX):
                continue
            try:
                m = _read_manifest(d)
            except ArtifactError:
                continue
            infos.append(
                ArtifactInfo(
                    id=m["id"],
                    name=str(m.get("name", "")),
                    preset=str(m.get("preset", "")),
                    created_at=str(m.get("created_at", "")),
                    parent_id=m.get("parent_id"),
                    path=d,
                    manifest=m,
                )
            )
        return sorted(infos, key=lambda i: (i.created_at, i.path.stat().st_mtime, i.id))

    def resolve(self, ref: str) -> Path:
        """Folder of the artifact whose id starts with `ref`, or else the newest one named `ref`."""
        infos = self.list()
        by_id = [i for i in infos if i.id.startswith(ref)] if ref else []
        if len(by_id) == 1:
            return by_id[0].path
        if len(by_id) > 1:
            raise ArtifactNotFound(f"id prefix {ref!r} is ambiguous: {sorted(i.id for i in by_id)}")
        by_name = [i for i in infos if i.name == ref]
        if by_name:
            return by_name[-1].path
        have = ", ".join(f"{i.id} ({i.name})" for i in infos) or "none"
        raise ArtifactNotFound(f"no artifact matches {ref!r} in {self.root}; available: {have}")

    def newest(self) -> ArtifactInfo:
        """The most recently created artifact (ArtifactNotFound when the store is empty)."""
        infos = self.list()
        if not infos:
            raise ArtifactNotFound(f"no artifacts in {self.root}")
        return infos[-1]

    def load(self, ref: str, device: str | torch.device = "cpu") -> Artifact:
        """`load_artifact(self.resolve(ref), device)`."""
        return load_artifact(self.resolve(ref), device)

    def remove(self, ref: str) -> str:
        """Delete the artifact `ref` resolves to (renamed aside first, so it vanishes at once); returns its id."""
        path = self.resolve(ref)
        model_id = path.name
        doomed = self.root / f"{_TMP_PREFIX}rm-{model_id}-{time.monotonic_ns()}"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        return model_id
