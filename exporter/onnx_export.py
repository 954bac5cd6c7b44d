"""Torch -> ONNX: one graph with explicit KV-cache inputs and outputs (see `onnx_contract`), fp32 and fp16.

The graph comes from `torch.onnx.export(dynamo=True)` at opset 21 (the INT4 quantizer needs opset >= 21 to
quantize the embedding's Gather), with dynamic batch, seq and past axes. The example inputs use lengths
above 1 on every dynamic axis, since torch.export specialises sizes 0 and 1; past = 0 still runs (tested).
fp16 is ORT's float16 conversion with float32 inputs and outputs kept, so every variant has the same I/O.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir
import torch

from model import onnx_contract as contract
from exporter.decoder_graphs import ExplicitKVDecoder
from model.transformer import GPT

__all__ = ["OPSET", "export_fp32", "convert_fp16", "check_contract"]

OPSET = 21
# Example sizes for tracing: any value >= 2 works (0 and 1 would be specialised by torch.export).
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 4


def _example_inputs(model: GPT) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    c = model.config
    input_ids = torch.zeros((_EXAMPLE_BATCH, _EXAMPLE_SEQ), dtype=torch.long)
    shape = (_EXAMPLE_BATCH, c.n_kv_head, _EXAMPLE_PAST, c.head_dim)
    past = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.n_layer)]
    return input_ids, past


def _dynamic_shapes(model: GPT) -> dict:
    c = model.config
    batch = torch.export.Dim(contract.AXIS_BATCH)
    seq = torch.export.Dim(contract.AXIS_SEQ, max=c.block_size)
    past = torch.export.Dim(contract.AXIS_PAST, max=c.block_size)
    kv_axes = {0: batch, 2: past}
    return {"input_ids": {0: batch, 1: seq}, "past": [(kv_axes, kv_axes) for _ in range(c.n_layer)]}


def export_fp32(model: GPT, path: Path) -> None:
    """Export `model` (float32, CPU) to `path` as one self-contained ONNX file, and check it."""
    model = model.float().eval()
    wrapper = ExplicitKVDecoder(model).eval()
    n_layer = model.config.n_layer
    # The dynamo exporter narrates every stage on stdout, warns about renamed dims and logs that torchvision
    # ops are not registered; keep the CLI quiet.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            _example_inputs(model),
            str(path),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(model),
            input_names=contract.input_names(n_layer),
            output_names=contract.output_names(n_layer),
            opset_version=OPSET,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    registration_log.setLevel(level)
    onnx.checker.check_model(str(path), full_check=True)
    check_contract(onnx.load(str(path), load_external_data=False), model)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, float32 inputs/outputs (ORT's converter; ops without fp16 kernels stay fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # The converter appends input casts after their users; ONNX requires topological order.
    ir_model = onnx_ir.from_proto(converted)
    ir_model.graph.sort()
    converted = onnx_ir.to_proto(ir_model)
    onnx.save(converted, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_contract(proto: onnx.ModelProto, model: GPT) -> None:
    """Assert the graph's inputs and outputs are exactly the contract's names, dtypes and static dims."""
    c = model.config
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    assert list(inputs) == contract.input_names(c.n_layer), f"inputs {list(inputs)}"
    assert list(outputs) == contract.output_names(c.n_layer), f"outputs {list(outputs)}"
    assert inputs[contract.INPUT_IDS].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(inputs[contract.INPUT_IDS]) == [contract.AXIS_BATCH, contract.AXIS_SEQ]
    assert _dims(outputs[contract.LOGITS])[1:] == [contract.AXIS_SEQ, c.vocab_size]
    for i in range(c.n_layer):
        for name in (contract.past_key_name(i), contract.past_value_name(i)):
            assert _dims(inputs[name]) == [contract.AXIS_BATCH, c.n_kv_head, contract.AXIS_PAST, c.head_dim], name
            assert inputs[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT, name
        for name in (contract.present_key_name(i), contract.present_value_name(i)):
            dims = _dims(outputs[name])
            assert dims[1] == c.n_kv_head and dims[3] == c.head_dim, f"{name} {dims}"
