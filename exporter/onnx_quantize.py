"""INT8 and INT4 ONNX files from the fp32 graph, with ONNX Runtime's own quantizers.

- INT8: `quantize_dynamic` (weights int8 per output channel, activations uint8 per tensor at run time,
  `MatMulInteger`), as Optimum's ORTQuantizer does for CPU.
- INT8 for small batches (`quantize_int8(weight_only=True)`, the fixed-KV graph's small-batch twin): weight-only
  8-bit `MatMulNBits`, symmetric blocks of 128 along K, accuracy_level 4 (the kernel quantizes each activation block
  to int8 itself and multiplies in int8; one node per MatMul). On this repo's CPU it runs a 1-2 row step 15-35% faster
  than the dynamic file and a 16-row step or a prefill 20-80% slower (inference_svc/PERF_NOTES.md 14), so a runtime
  uses it for its small calls only. Without MLAS's int8 kernel for it (accuracy_level 0), ORT would dequantize the
  weights on every call: ~15 ms a step here instead of ~0.5.
- INT4: `MatMulNBitsQuantizer`, symmetric blocks of 32 along K (`MatMulNBits`), and the token embedding's
  Gather too (`GatherBlockQuantized`, which needs opset >= 21). accuracy_level 4 here too.
A tied LM head reaches the graph as Transpose(embedding); the quantizers only take constant weights, so the
transpose is folded into a constant first (the head is the largest MatMul of a small-vocab model and the
largest by far at vocab 50k).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import numpy_helper

__all__ = ["INT4_BLOCK_SIZE", "INT8_BLOCK_SIZE", "fold_constant_transposes", "quantize_int8", "quantize_int4"]

INT4_BLOCK_SIZE = 32
# 128: the fastest of 32 / 64 / 128 / 256 for the shakespeare-char step here (K = 384 or 1536; 256 does not divide
# 384); finer than the dynamic quantization's one scale per output channel over all of K.
INT8_BLOCK_SIZE = 128
# MatMulNBits accuracy_level 4: int8 activations (blockwise, at run time) and int8 multiplies, the fast CPU path.
_ACCURACY_LEVEL = 4


def fold_constant_transposes(proto: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) nodes by a transposed initializer, in place; returns how many."""
    inits = {i.name: i for i in proto.graph.initializer}
    folded = []
    for node in proto.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        array = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        transposed = array.transpose(perm) if perm else array.T
        proto.graph.initializer.append(numpy_helper.from_array(transposed.copy(), node.output[0]))
        folded.append(node)
    for node in folded:
        proto.graph.node.remove(node)
    return len(folded)


class _DropPreprocessingAdvice(logging.Filter):
    """quantize_dynamic logs advice to run ORT's pre-processing on the root logger at every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizers log every node at INFO, and advice at WARNING; keep that noise out of the CLI."""
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    advice = _DropPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def quantize_int8(src: Path, dst: Path, *, weight_only: bool = False, block_size: int = INT8_BLOCK_SIZE) -> None:
    """INT8 weights for every constant-weight MatMul of `src` into `dst`: ORT's dynamic quantization (`MatMulInteger`),
    or with `weight_only` 8-bit `MatMulNBits` in symmetric `block_size` blocks (the small-batch file)."""
    if weight_only:
        _quantize_nbits(src, dst, bits=8, block_size=block_size, op_types=("MatMul",), quant_axes=(("MatMul", 0),))
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(src))
    fold_constant_transposes(proto)
    with _quiet_quantizer():
        quantize_dynamic(
            proto,
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    onnx.checker.check_model(str(dst))


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK_SIZE) -> None:
    """Weight-only INT4 (symmetric, `block_size` blocks) of every constant MatMul and the embedding Gather."""
    _quantize_nbits(
        src,
        dst,
        bits=4,
        block_size=block_size,
        op_types=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )


def _quantize_nbits(
    src: Path, dst: Path, *, bits: int, block_size: int, op_types: tuple[str, ...], quant_axes: tuple
) -> None:
    """`MatMulNBitsQuantizer` (symmetric blocks along `quant_axes`, accuracy_level 4) of `src` into `dst`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    proto = onnx.load(str(src))
    fold_constant_transposes(proto)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=_ACCURACY_LEVEL,
        op_types_to_quantize=op_types,
        quant_axes=quant_axes,
        bits=bits,
    )
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
    with _quiet_quantizer():
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    onnx.checker.check_model(str(dst))
