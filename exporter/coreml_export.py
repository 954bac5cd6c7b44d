"""Torch -> CoreML ML programs (`.mlpackage`, fp16): a stateful KV-cache model and a stateless one, each also
with int8 and int4 weights (coremltools.optimize linear quantization).

- stateful (iOS18, `ct.StateType`): inputs `input_ids` (1, T) int32 and `causal_mask` (1, 1, T, P + T) fp16,
  whose last dimension tells the model the cache length (Apple's stateful-Mistral recipe); states
  `key_cache`, `value_cache` (n_layer, 1, n_kv_head, block_size, head_dim) fp16; output `logits` (1, T, V).
- stateless (iOS18): input `input_ids` (1, T), output `logits`; the whole context is recomputed per call.
Both come from `torch.jit.trace` of `decoder_graphs` wrappers (the path TOOLCHAIN.md found working with
numpy 2.3.5). Running a model needs macOS; on Linux `validate_package` checks what the spec can show
(inputs, outputs, states, quantized-weight ops), and `trace_parity` checks that the traced graph is
shape-general by running it at several (T, P) against the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.decoder_graphs import StatefulKVDecoder, StatelessDecoder
from exporter.errors import ExportError
from model.transformer import GPT

__all__ = ["COREML_DIR", "VARIANTS", "CoreMLVariant", "export_coreml", "validate_package", "trace_parity"]

COREML_DIR = "coreml"
INT4_BLOCK_SIZE = 32
_QUANT_OP = "constexpr_blockwise_shift_scale"  # iOS18's dequantize-on-load op for int8 and int4 weights


@dataclass(frozen=True)
class CoreMLVariant:
    name: str  # file stem in coreml/
    stateful: bool
    weights: str  # "fp16" | "int8" | "int4"

    @property
    def file(self) -> str:
        return f"{self.name}.mlpackage"


VARIANTS: tuple[CoreMLVariant, ...] = tuple(
    CoreMLVariant(f"model-{kind}" + ("" if w == "fp16" else f"-{w}"), kind == "stateful", w)
    for kind in ("stateful", "stateless")
    for w in ("fp16", "int8", "int4")
)


@contextlib.contextmanager
def _quiet():
    """coremltools draws progress bars on stderr and warns about the untested torch version."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        level = logging.root.level
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            logging.root.setLevel(level)


def _import_ct() -> Any:
    with _quiet():
        import coremltools as ct
        import coremltools.optimize.coreml as cto  # noqa: F401  (submodule import registers it)
    return ct


def _trace(model: GPT, stateful: bool) -> torch.jit.ScriptModule:
    model = model.float().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the shape-derived ints, which stay dynamic
        if stateful:
            wrapper = StatefulKVDecoder(model, model.config.block_size).eval()
            return torch.jit.trace(wrapper, (torch.zeros((1, 2), dtype=torch.long), torch.zeros((1, 1, 2, 5))))
        return torch.jit.trace(StatelessDecoder(model).eval(), (torch.zeros((1, 3), dtype=torch.long),))


def _convert(ct: Any, traced: torch.jit.ScriptModule, config: Any, stateful: bool) -> Any:
    seq = ct.RangeDim(lower_bound=1, upper_bound=config.block_size, default=1)
    inputs = [ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32)]
    states = []
    if stateful:
        kv = ct.RangeDim(lower_bound=1, upper_bound=config.block_size, default=1)
        inputs.append(ct.TensorType(name="causal_mask", shape=(1, 1, seq, kv), dtype=np.float16))
        shape = (config.n_layer, 1, config.n_kv_head, config.block_size, config.head_dim)
        states = [
            ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
            for name in ("key_cache", "value_cache")
        ]
    return ct.convert(
        traced,
        inputs=inputs,
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        states=states or None,
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram",
    )


def _compress(ct: Any, mlmodel: Any, weights: str) -> Any:
    import coremltools.optimize.coreml as cto

    if weights == "int8":
        op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    else:
        op_config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=INT4_BLOCK_SIZE
        )
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op_config))


def export_coreml(
    model: GPT, out_dir: Path, prompt: torch.Tensor
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Write every variant of `VARIANTS` into `out_dir`; returns ({variant name: spec summary}, trace parity
    on `prompt` (1, T), see `trace_parity`). A conversion that fails raises ExportError naming the variant
    and the converter's error."""
    ct = _import_ct()
    summaries: dict[str, dict[str, Any]] = {}
    traces = {}
    for stateful in (True, False):
        kind = "stateful" if stateful else "stateless"
        try:
            traces[kind] = traced = _trace(model, stateful)
            with _quiet():
                base = _convert(ct, traced, model.config, stateful)
        except Exception as e:  # the converter raises many types; report which variant and why
            raise ExportError(f"coreml: converting the {kind} model failed: {type(e).__name__}: {e}") from e
        for variant in (v for v in VARIANTS if v.stateful == stateful):
            try:
                with _quiet():
                    mlmodel = base if variant.weights == "fp16" else _compress(ct, base, variant.weights)
                    mlmodel.save(str(out_dir / variant.file))
            except Exception as e:
                raise ExportError(f"coreml: {variant.name} failed: {type(e).__name__}: {e}") from e
            summaries[variant.name] = validate_package(out_dir / variant.file, variant, model.config)
    return summaries, trace_parity(model, prompt, traces["stateful"], traces["stateless"])


def _ops(spec: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def validate_package(path: Path, variant: CoreMLVariant, config: Any) -> dict[str, Any]:
    """Reload a saved package's spec (no Core ML runtime needed) and check its interface; returns a summary.

    Raises ExportError when the inputs, outputs, states or quantized-weight ops are not what the variant needs.
    """
    ct = _import_ct()
    with _quiet():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    desc = spec.description
    inputs = [i.name for i in desc.input]
    outputs = [o.name for o in desc.output]
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in desc.state}
    ops = _ops(spec)
    problems = []
    want_inputs = ["input_ids", "causal_mask"] if variant.stateful else ["input_ids"]
    if inputs != want_inputs:
        problems.append(f"inputs {inputs}, expected {want_inputs}")
    if outputs != ["logits"]:
        problems.append(f"outputs {outputs}, expected ['logits']")
    kv_shape = [config.n_layer, 1, config.n_kv_head, config.block_size, config.head_dim]
    want_states = {"key_cache": kv_shape, "value_cache": kv_shape} if variant.stateful else {}
    if states != want_states:
        problems.append(f"states {states}, expected {want_states}")
    if variant.stateful and not (ops.get("read_state") and ops.get("write_state")):
        problems.append("no read_state/write_state ops")
    n_quant = ops.get(_QUANT_OP, 0)
    if (variant.weights == "fp16") != (n_quant == 0):
        problems.append(f"{n_quant} {_QUANT_OP} ops for {variant.weights} weights")
    if problems:
        raise ExportError(f"coreml: {variant.name}: " + "; ".join(problems))
    return {
        "file": variant.file,
        "stateful": variant.stateful,
        "weights": variant.weights,
        "deployment_target": "iOS18",
        "spec_version": spec.specificationVersion,
        "inputs": inputs,
        "outputs": outputs,
        "states": states,
        "quantized_weight_ops": n_quant,
        "n_ops": sum(ops.values()),
    }


def trace_parity(
    model: GPT,
    prompt: torch.Tensor,
    stateful: torch.jit.ScriptModule | None = None,
    stateless: torch.jit.ScriptModule | None = None,
    steps: int = 4,
) -> dict[str, float]:
    """Max |Δlogits| of the traced graphs (what the converter reads; traced afresh when not given) against
    `model.forward` on `prompt` (1, T): the stateful one through a prefill of T - steps tokens and `steps`
    one-token decodes, the stateless one on the whole prompt. A shape baked into a trace shows up here."""
    model = model.float().eval()
    n = prompt.shape[1]
    assert n > steps >= 1, f"prompt of {n} tokens is too short for {steps} decode steps"
    stateful = stateful or _trace(model, True)
    stateless = stateless or _trace(model, False)
    with torch.no_grad():
        reference = model(prompt)[0]  # (1, n, V)
        first = n - steps
        got = [stateful(prompt[:, :first], torch.zeros(1, 1, first, first))]
        for t in range(first, n):
            got.append(stateful(prompt[:, t : t + 1], torch.zeros(1, 1, 1, t + 1)))
        stateful_diff = (torch.cat(got, dim=1) - reference).abs().max().item()
        stateless_diff = (stateless(prompt) - reference).abs().max().item()
    return {"stateful_max_abs_diff": stateful_diff, "stateless_max_abs_diff": stateless_diff}
