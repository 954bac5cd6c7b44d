"""Torch -> ONNX: one graph with explicit KV-cache inputs and outputs (see `onnx_contract`), fp32 and fp16, and
beside it the fixed-KV graph (a host-owned cache buffer read in place; only the new K/V come out).

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
from exporter.decoder_graphs import ExplicitKVDecoder, FixedKVDecoder
from model.transformer import GPT

__all__ = ["OPSET", "export_fp32", "convert_fp16", "check_contract"]

OPSET = 21
# Example sizes for tracing: any value >= 2 works (0 and 1 would be specialised by torch.export).
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 4
_EXAMPLE_CACHE = 11  # fixed-KV buffer capacity: above the example past lengths, unlike every other example size


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


def _fixed_kv_example_inputs(model: GPT) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    c = model.config
    input_ids = torch.zeros((_EXAMPLE_BATCH, _EXAMPLE_SEQ), dtype=torch.long)
    past_lengths = torch.arange(_EXAMPLE_BATCH, dtype=torch.long) + _EXAMPLE_PAST  # rows at different lengths
    shape = (_EXAMPLE_BATCH, c.n_kv_head, _EXAMPLE_CACHE, c.head_dim)
    return input_ids, past_lengths, [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.n_layer)]


def _fixed_kv_dynamic_shapes(model: GPT) -> dict:
    batch = torch.export.Dim(contract.AXIS_BATCH)
    seq = torch.export.Dim(contract.AXIS_SEQ, max=model.config.block_size)
    cache_axes = {0: batch, 2: torch.export.Dim(contract.AXIS_CACHE, max=model.config.block_size)}
    return {
        "input_ids": {0: batch, 1: seq},
        "past_lengths": {0: batch},
        "cache": [(cache_axes, cache_axes) for _ in range(model.config.n_layer)],
    }


def export_fp32(model: GPT, path: Path, *, fixed_kv: bool = False) -> None:
    """Export `model` (float32, CPU) to `path` as one self-contained ONNX file, and check it: the past -> present
    graph (`ExplicitKVDecoder`), or with `fixed_kv` the fixed-KV graph (`FixedKVDecoder`)."""
    model = model.float().eval()
    n_layer = model.config.n_layer
    if fixed_kv:
        wrapper, example, shapes = (
            FixedKVDecoder(model),
            _fixed_kv_example_inputs(model),
            _fixed_kv_dynamic_shapes(model),
        )
        names = contract.fixed_kv_input_names(n_layer), contract.fixed_kv_output_names(n_layer)
    else:
        wrapper, example, shapes = ExplicitKVDecoder(model), _example_inputs(model), _dynamic_shapes(model)
        names = contract.input_names(n_layer), contract.output_names(n_layer)
    _export(wrapper, example, shapes, names, path)
    check_contract(onnx.load(str(path), load_external_data=False), model, fixed_kv=fixed_kv)


def _export(wrapper: torch.nn.Module, example: tuple, dynamic_shapes: dict, names: tuple, path: Path) -> None:
    """torch.onnx.export (dynamo, OPSET, one file) of `wrapper` in eval mode, quietly; checks the file."""
    wrapper = wrapper.eval()
    # The dynamo exporter narrates every stage on stdout, warns about renamed dims and logs that torchvision
    # ops are not registered; keep the CLI quiet.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            example,
            str(path),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=names[0],
            output_names=names[1],
            opset_version=OPSET,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    registration_log.setLevel(level)
    onnx.checker.check_model(str(path), full_check=True)


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


def check_contract(proto: onnx.ModelProto, model: GPT, *, fixed_kv: bool = False) -> None:
    """Assert the graph's inputs and outputs are exactly the contract's names, dtypes and static dims (the fixed-KV
    graph's with `fixed_kv`)."""
    c = model.config
    in_names = (contract.fixed_kv_input_names if fixed_kv else contract.input_names)(c.n_layer)
    out_names = (contract.fixed_kv_output_names if fixed_kv else contract.output_names)(c.n_layer)
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    assert list(inputs) == in_names, f"inputs {list(inputs)}"
    assert list(outputs) == out_names, f"outputs {list(outputs)}"
    assert inputs[contract.INPUT_IDS].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(inputs[contract.INPUT_IDS]) == [contract.AXIS_BATCH, contract.AXIS_SEQ]
    assert _dims(outputs[contract.LOGITS])[1:] == [contract.AXIS_SEQ, c.vocab_size]
    if fixed_kv:
        assert _dims(inputs[contract.PAST_LENGTHS]) == [contract.AXIS_BATCH]
        assert inputs[contract.PAST_LENGTHS].type.tensor_type.elem_type == onnx.TensorProto.INT64
    cache_axis = contract.AXIS_CACHE if fixed_kv else contract.AXIS_PAST
    for name in in_names[2 if fixed_kv else 1 :]:
        assert _dims(inputs[name]) == [contract.AXIS_BATCH, c.n_kv_head, cache_axis, c.head_dim], name
        assert inputs[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT, name
    for name in out_names[1:]:
        dims = _dims(outputs[name])
        assert dims[1] == c.n_kv_head and dims[3] == c.head_dim, f"{name} {dims}"
