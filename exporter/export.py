"""Export one artifact to the asked formats, measure parity, apply the gates, publish atomically.

    report = export_artifact(store.resolve("abc123"), ["onnx", "int8", "int4"], eval_text=held_out)

The source files (config, tokenizer, weights, manifest) are only read. Outputs are built in a staging folder
inside the artifact and moved in only when every gate passed (or `no_gate`, which keeps failed variants and
marks them failed). Outputs: `onnx/` (the files of `onnx_contract.VARIANT_FILES` asked for, each with its fixed-KV
graph of `FIXED_KV_FILES` measured against the same gates, INT8's also with its small-batch twin of
`SMALL_BATCH_FILES`, + `meta.json`),
`coreml/`, `hf/`, and `parity.json`. Re-exporting a subset keeps the other ONNX files and their entries.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from model import onnx_contract as contract
from exporter.coreml_export import COREML_DIR, export_coreml
from exporter.errors import ExportError, GateFailed
from exporter.formats import onnx_variants, parse_formats
from exporter.gates import Gates, apply_gates
from exporter.hf_export import HF_DIR, export_hf, hf_architecture
from exporter.onnx_export import OPSET, convert_fp16, export_fp32
from exporter.onnx_quantize import INT4_BLOCK_SIZE, INT8_BLOCK_SIZE, quantize_int4, quantize_int8
from exporter.parity import ParitySettings, Reference, measure_hf, measure_onnx
from exporter.staging import Staging, dir_bytes
from model.artifact import Artifact, ArtifactError, load_artifact

__all__ = ["PARITY_FILE", "export_artifact", "load_source"]

PARITY_FILE = "parity.json"
Progress = Callable[[str, float], None]

_WEIGHTS = {
    "fp32": "float32",
    "fp16": "float16",
    "int8": "int8 (per-channel, dynamic activations)",
    "int4": f"int4 (block {INT4_BLOCK_SIZE})",
}
# Keys of a variant's twin files in its entry; "<key>." prefixes their gate metrics in the variant's gates.
_FIXED_KV, _SMALL_BATCH = "fixed_kv", "small_batch"
_MAKERS = {
    "fp16": convert_fp16,
    "int8": quantize_int8,
    "int4": quantize_int4,
}


def load_source(artifact_dir: str | Path) -> Artifact:
    """Load and verify the artifact; a missing or corrupt one raises ExportError saying what is wrong."""
    try:
        return load_artifact(artifact_dir)
    except ArtifactError as e:
        raise ExportError(f"model: {e}") from None
    except Exception as e:  # unreadable safetensors, bad JSON: corrupt either way
        raise ExportError(f"model: artifact {artifact_dir} is corrupt: {type(e).__name__}: {e}") from None


def _variant_entry(
    fmt: str, files: list[str], root: Path, measured: dict[str, Any], gates: Gates, name: str
) -> dict[str, Any]:
    results = apply_gates(name, measured, gates)
    return {
        "format": fmt,
        "files": files,
        "bytes": sum(dir_bytes(root / f) for f in files),
        **measured,
        "gates": results,
        "passed": all(r["passed"] for r in results),
    }


def _export_onnx(
    art: Artifact,
    ref: Reference,
    formats: tuple[str, ...],
    out: Path,
    gates: Gates,
    progress: Progress,
    check: Callable[[], None],
) -> dict[str, dict[str, Any]]:
    variants = onnx_variants(formats)
    entries = {}
    for i, variant in enumerate(variants):
        check()
        progress(f"onnx {variant}", i / len(variants))
        name = f"onnx-{variant}"
        path, fixed_path = out / contract.VARIANT_FILES[variant], out / contract.FIXED_KV_FILES[variant]
        if variant == "fp32":
            export_fp32(art.model, path)
            export_fp32(art.model, fixed_path, fixed_kv=True)
        else:
            _MAKERS[variant](out / contract.VARIANT_FILES["fp32"], path)
            _MAKERS[variant](out / contract.FIXED_KV_FILES["fp32"], fixed_path)
        fmt = {"fp32": "onnx", "fp16": "onnx"}.get(variant, variant)
        measured = {"weights": _WEIGHTS[variant], **measure_onnx(path, ref)}
        rels = [f"{contract.ONNX_DIR}/{p.name}" for p in (path, fixed_path)]
        entry = _variant_entry(fmt, rels[:1], out.parent, measured, gates, name)
        entry = _with_twin(entry, _FIXED_KV, rels[1], out.parent, measure_onnx(fixed_path, ref), gates, name)
        if variant in contract.SMALL_BATCH_FILES:  # INT8: the fixed-KV graph again, quantized for 1-2 row calls
            small = out / contract.SMALL_BATCH_FILES[variant]
            quantize_int8(out / contract.FIXED_KV_FILES["fp32"], small, weight_only=True)
            rel = f"{contract.ONNX_DIR}/{small.name}"
            entry = _with_twin(entry, _SMALL_BATCH, rel, out.parent, measure_onnx(small, ref), gates, name)
        entries[name] = entry
    return entries


def _with_twin(
    entry: dict[str, Any], key: str, rel: str, root: Path, measured: dict[str, Any], gates: Gates, name: str
) -> dict[str, Any]:
    """`entry` with a twin file of its variant (`fixed_kv`: its fixed-KV graph; `small_batch`: that graph quantized for
    small calls): listed in `files`, measured under `key`, and gated as the variant is (its gate results join the
    variant's, metrics prefixed "<key>.")."""
    twin_gates = [{**g, "metric": f"{key}.{g['metric']}"} for g in apply_gates(name, measured, gates)]
    twin = {"file": rel, "bytes": dir_bytes(root / rel), **measured, "passed": all(g["passed"] for g in twin_gates)}
    return {
        **entry,
        "files": entry["files"] + [rel],
        key: twin,
        "gates": entry["gates"] + twin_gates,
        "passed": entry["passed"] and twin["passed"],
    }


def _write_onnx_meta(art: Artifact, onnx_dir: Path, old_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """meta.json of the published onnx/ folder; files of an earlier export that were not redone are kept."""
    c = art.config
    old_meta = (
        json.loads((old_dir / contract.META_FILE).read_text()) if (old_dir / contract.META_FILE).is_file() else {}
    )
    files = {}
    for variant, name in contract.VARIANT_FILES.items():
        entry = entries.get(f"onnx-{variant}")
        fixed_name = contract.FIXED_KV_FILES[variant]
        if entry is not None:
            fixed = entry[_FIXED_KV]
            own_gates = [g for g in entry["gates"] if not g["metric"].startswith((f"{_FIXED_KV}.", f"{_SMALL_BATCH}."))]
            files[variant] = {
                "file": name,
                "weights": entry["weights"],
                "io_dtype": contract.IO_DTYPE,
                "bytes": entry["bytes"],
                "gate": _gate(all(g["passed"] for g in own_gates)),
                "fixed_kv": {"file": fixed_name, "bytes": fixed["bytes"], "gate": _gate(fixed["passed"])},
            }
            if _SMALL_BATCH in entry:
                small = entry[_SMALL_BATCH]
                files[variant]["fixed_kv"][_SMALL_BATCH] = {
                    "file": contract.SMALL_BATCH_FILES[variant],
                    "weights": f"int8 (block {INT8_BLOCK_SIZE}, weight-only; int8 activations at run time)",
                    "bytes": small["bytes"],
                    "gate": _gate(small["passed"]),
                }
        elif (old_dir / name).is_file() and variant in old_meta.get("files", {}):
            for kept in (name, fixed_name, contract.SMALL_BATCH_FILES.get(variant)):
                if kept and (old_dir / kept).is_file():  # hard link: no copy, and the old folder is replaced anyway
                    os.link(old_dir / kept, onnx_dir / kept)
            files[variant] = old_meta["files"][variant]
    meta = {
        "contract_version": contract.CONTRACT_VERSION,
        "model_id": art.manifest["id"],
        "opset": OPSET,
        "inputs": contract.input_names(c.n_layer),
        "outputs": contract.output_names(c.n_layer),
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_kv_head": c.n_kv_head,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "block_size": c.block_size,
        "dynamic_axes": [contract.AXIS_BATCH, contract.AXIS_SEQ, contract.AXIS_PAST],
        "files": files,
        "fixed_kv": {
            "inputs": contract.fixed_kv_input_names(c.n_layer),
            "outputs": contract.fixed_kv_output_names(c.n_layer),
            "max_len": c.block_size,
            "dynamic_axes": [contract.AXIS_BATCH, contract.AXIS_SEQ, contract.AXIS_CACHE],
        },
    }
    (onnx_dir / contract.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _gate(passed: bool) -> str:
    return "passed" if passed else "failed"


def _merged_variants(artifact_dir: Path, new: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """New entries, plus earlier ones whose files are still there and were not redone."""
    old_path = artifact_dir / PARITY_FILE
    if not old_path.is_file():
        return new
    try:
        old = json.loads(old_path.read_text()).get("variants", {})
    except (json.JSONDecodeError, AttributeError):
        return new
    kept = {
        k: v for k, v in old.items() if k not in new and all((artifact_dir / f).exists() for f in v.get("files", []))
    }
    return {**kept, **new}


def _coreml_stage(art: Artifact, ref: Reference, out: Path, gates: Gates) -> dict[str, Any]:
    packages, diffs = export_coreml(art.model, out, torch.from_numpy(ref.corpus_prompts[:1]))
    measured = {
        "max_abs_logits": max(diffs.values()),
        "trace_parity": diffs,
        "packages": packages,
        "predict": "not run: Core ML prediction needs macOS; spec and traced graph checked",
    }
    files = [f"{COREML_DIR}/{p['file']}" for p in packages.values()]
    return _variant_entry("coreml", files, out.parent, measured, gates, "coreml")


def _hf_stage(art: Artifact, ref: Reference, out: Path, gates: Gates) -> dict[str, Any]:
    measured = {**export_hf(art.model, art.tokenizer, out), **measure_hf(out, ref)}
    files = [f"{HF_DIR}/{p.name}" for p in sorted(out.iterdir())]
    return _variant_entry("hf", files, out.parent, measured, gates, "hf")


# Formats after ONNX: (format = its folder, progress fraction at its start, stage).
_FOLDER_STAGES = ((COREML_DIR, 0.7, _coreml_stage), (HF_DIR, 0.9, _hf_stage))


def _gate_failure(variants: dict[str, dict[str, Any]]) -> str:
    failed = [
        f"{name}: {g['metric']} {g['value']:.4g} (limit {g['op']} {g['limit']})"
        for name, v in variants.items()
        for g in v["gates"]
        if not g["passed"]
    ]
    return "parity gate failed: " + "; ".join(failed) + " (nothing written; --no-gate keeps the files)"


def export_artifact(
    artifact_dir: str | Path,
    formats: str | list[str] | tuple[str, ...] | None = None,
    *,
    eval_text: str | None = None,
    no_gate: bool = False,
    gates: Gates = Gates(),
    settings: ParitySettings = ParitySettings(),
    progress: Progress | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Export, measure, gate and publish; returns the parity report of this export (parity.json also keeps
    the entries of earlier exports whose files are still there).

    Raises ExportError for a bad request or artifact (nothing written), GateFailed when a gate fails and
    `no_gate` is false (nothing written; the report is on the exception). `check_cancelled` is called between
    stages and may raise to abandon the export (nothing written).
    """
    wanted = parse_formats(formats)
    artifact_dir = Path(artifact_dir)
    art = load_source(artifact_dir)
    if "hf" in wanted:
        hf_architecture(art.config)  # refuse early, before minutes of work
    progress = progress or (lambda message, fraction: None)
    check = check_cancelled or (lambda: None)
    t0 = time.perf_counter()
    progress("parity reference (PyTorch)", 0.0)
    try:
        ref = Reference.build(art.model, art.tokenizer, eval_text, settings)
    except ValueError as e:
        raise ExportError(f"eval text: {e}") from None
    timings = {"reference": time.perf_counter() - t0}
    variants: dict[str, dict[str, Any]] = {}
    with Staging(artifact_dir) as staging:
        published = []
        if onnx_variants(wanted):
            t = time.perf_counter()
            onnx_dir = staging.folder(contract.ONNX_DIR)
            onnx_progress = lambda message, f: progress(message, 0.05 + 0.6 * f)  # noqa: E731
            variants.update(_export_onnx(art, ref, wanted, onnx_dir, gates, onnx_progress, check))
            _write_onnx_meta(art, onnx_dir, artifact_dir / contract.ONNX_DIR, variants)
            published.append(contract.ONNX_DIR)
            timings["onnx"] = time.perf_counter() - t
        for fmt, fraction, stage in _FOLDER_STAGES:
            if fmt in wanted:
                check()
                progress(fmt, fraction)
                t = time.perf_counter()
                variants[fmt] = stage(art, ref, staging.folder(fmt), gates)
                published.append(fmt)
                timings[fmt] = time.perf_counter() - t

        passed = all(v["passed"] for v in variants.values())
        report = {
            "model_id": art.manifest["id"],
            "artifact": str(artifact_dir),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "formats": list(wanted),
            "gated": not no_gate,
            "passed": passed,
            "status": "passed" if passed else "failed",
            "gate_limits": asdict(gates),
            "reference": ref.summary(),
            "variants": variants,
            "timings_s": {**timings, "total": time.perf_counter() - t0},
        }
        if not passed and not no_gate:
            raise GateFailed(_gate_failure(variants), report)
        check()
        merged = dict(report, variants=_merged_variants(artifact_dir, variants))
        merged["passed"] = all(v["passed"] for v in merged["variants"].values())
        merged["status"] = "passed" if merged["passed"] else "failed"
        (staging.root / PARITY_FILE).write_text(json.dumps(merged, indent=2) + "\n")
        staging.publish(published + [PARITY_FILE])
    progress("done", 1.0)
    return report
