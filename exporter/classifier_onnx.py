"""Sequence classifier -> ONNX, with a parity gate against PyTorch through ONNX Runtime.

The graph takes `input_ids` (batch, seq) int64 and `attention_mask` (batch, seq) int64 (1 = token, 0 = right
padding) and returns `logits` (batch, n_classes) float32; batch and seq are dynamic (seq up to block_size). It comes
from `torch.onnx.export(dynamo=True)` at the decoder's opset. The gate runs both on the same padded batch and fails
when any logit differs by more than `PARITY_ATOL`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from exporter.errors import GateFailed
from exporter.onnx_export import OPSET
from model.classifier import SequenceClassifier

__all__ = ["INPUT_IDS", "ATTENTION_MASK", "LOGITS", "PARITY_ATOL", "classifier_parity", "export_classifier"]

INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
PARITY_ATOL = 1e-4
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 5  # >= 2 on each dynamic axis: torch.export specialises sizes 0 and 1


def export_classifier(clf: SequenceClassifier, path: str | Path) -> Path:
    """Write `clf` (made float32, eval) to `path` as one self-contained ONNX file and check it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clf = clf.float().eval()
    block = clf.gpt.config.block_size
    ids = torch.zeros((_EXAMPLE_BATCH, min(_EXAMPLE_SEQ, block)), dtype=torch.long)
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=block)
    # The dynamo exporter narrates its stages on stdout and warns about renamed dims: keep callers' output clean.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            clf,
            (ids, mask),
            str(path),
            dynamo=True,
            dynamic_shapes={"idx": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}},
            input_names=[INPUT_IDS, ATTENTION_MASK],
            output_names=[LOGITS],
            opset_version=OPSET,
            external_data=False,
            optimize=True,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def classifier_parity(
    clf: SequenceClassifier, path: str | Path, ids: torch.Tensor, mask: torch.Tensor, *, atol: float = PARITY_ATOL
) -> dict[str, Any]:
    """Run the ONNX file (ORT, CPU) and `clf` on ids, mask (B, T); return the report, or raise GateFailed when the
    largest |logit difference| exceeds `atol`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_IDS: ids.to(torch.int64).numpy(), ATTENTION_MASK: mask.to(torch.int64).numpy()}
    (onnx_logits,) = session.run([LOGITS], feed)
    with torch.no_grad():
        torch_logits = clf.float().eval()(ids, mask).numpy()
    diff = float(np.abs(onnx_logits - torch_logits).max())
    report = {
        "max_abs_diff": diff,
        "atol": atol,
        "batch": int(ids.shape[0]),
        "seq": int(ids.shape[1]),
        "passed": diff <= atol,
    }
    if not report["passed"]:
        raise GateFailed(f"classifier ONNX parity failed: max |logit difference| {diff:.3g} > {atol:g}", report)
    return report
