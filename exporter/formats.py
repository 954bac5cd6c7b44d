"""The export formats a caller may ask for, and what each one writes."""

from __future__ import annotations

from collections.abc import Iterable

from exporter.errors import ExportError

__all__ = ["FORMATS", "parse_formats", "onnx_variants"]

# Format -> what it produces. "onnx" is fp32 + fp16; int8/int4 are quantized from the fp32 graph. Each ONNX file
# comes with its fixed-KV graph, model-fixedkv[-<variant>].onnx (onnx_contract.FIXED_KV_FILES).
FORMATS: dict[str, str] = {
    "onnx": "onnx/model.onnx (fp32) and onnx/model-fp16.onnx, each + its fixed-KV graph (model-fixedkv*.onnx)",
    "int8": "onnx/model-int8.onnx (ORT dynamic quantization, MatMulInteger) + model-fixedkv-int8.onnx, and its "
    "small-batch twin model-fixedkv-int8-small-batch.onnx (weight-only 8-bit MatMulNBits)",
    "int4": "onnx/model-int4.onnx (MatMulNBits / GatherBlockQuantized, block 32) + model-fixedkv-int4.onnx",
    "coreml": "coreml/*.mlpackage (stateful and stateless; fp16, int8, int4)",
    "hf": "hf/ (config.json + model.safetensors, Llama or GPT-2 names)",
}


def parse_formats(formats: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise "onnx,int8" or ["onnx", "int8"] to a tuple in canonical order; empty/None means all.

    An unknown name raises ExportError listing the allowed ones.
    """
    if formats is None:
        names: list[str] = []
    elif isinstance(formats, str):
        names = [f for f in formats.split(",")]
    else:
        names = list(formats)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown:
        raise ExportError(f"formats: unknown {unknown}; allowed: {', '.join(FORMATS)} (empty means all)")
    if not names:
        return tuple(FORMATS)
    return tuple(f for f in FORMATS if f in names)


def onnx_variants(formats: Iterable[str]) -> tuple[str, ...]:
    """The ONNX files (variants of onnx_contract.VARIANT_FILES) a set of formats needs.

    fp32 is always among them when any ONNX format is asked: it is the reference and the quantizers' input.
    """
    formats = set(formats)
    variants = []
    if formats & {"onnx", "int8", "int4"}:
        variants.append("fp32")
    if "onnx" in formats:
        variants.append("fp16")
    variants += [v for v in ("int8", "int4") if v in formats]
    return tuple(variants)
