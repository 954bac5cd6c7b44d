"""From a `tinylm.v1.TrainSpec` (what a gRPC caller or a queued job asks for) to a validated TrainConfig.

Zero / empty fields mean "the preset's default", as the proto says. A bad value raises `SpecError` naming
the spec's own field (`learning_rate`, `overrides[dropout]`), so the service can answer INVALID_ARGUMENT
with a name the caller knows. The worker decides where a run lives, so `log_dir` and `resume` cannot be
overridden from outside.
"""

from __future__ import annotations

from jobs.spec_checks import NestedSpecError, check_bench_spec
from protos import jobs_pb2
from trainer.config import ConfigError, TrainConfig, load_config

__all__ = ["SpecError", "config_from_spec", "EXPORT_FORMATS", "RESERVED_OVERRIDES"]

EXPORT_FORMATS = ("onnx", "int8", "int4", "coreml", "hf")
RESERVED_OVERRIDES = ("log_dir", "resume")

# TrainConfig key -> the TrainSpec field that sets it.
_SPEC_FIELD = {
    "preset": "preset",
    "tokenizer": "tokenizer",
    "max_steps": "max_steps",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "eval_interval": "eval_interval",
    "seed": "seed",
    "device": "device",
    "name": "model_name",
}
# Cross-field checks: the key they fail on -> the spec field the caller most likely changed.
_BLAME = {"min_lr": "learning_rate", "grad_accum": "batch_size"}


class SpecError(ValueError):
    """A TrainSpec field is invalid; `field` names it as the proto does."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def config_from_spec(spec: jobs_pb2.TrainSpec) -> TrainConfig:
    """The TrainConfig a spec asks for (preset defaults, then the spec's fields, then its overrides)."""
    if not spec.preset:
        raise SpecError(
            "preset",
            "is required; one of tiny, small, shakespeare-char, shakespeare-char-fast, medium, large, gpt2-124m",
        )
    for key in spec.overrides:
        if key in RESERVED_OVERRIDES:
            raise SpecError(f"overrides[{key}]", "is set by the trainer's worker and cannot be overridden")
    for name in ("max_steps", "batch_size", "eval_interval", "seed"):
        if getattr(spec, name) < 0:
            raise SpecError(name, f"must be >= 0 (0: the preset's default), got {getattr(spec, name)}")
    if spec.learning_rate < 0:
        raise SpecError("learning_rate", f"must be >= 0 (0: the preset's default), got {spec.learning_rate}")
    for index, fmt in enumerate(spec.then_export.formats):
        if fmt not in EXPORT_FORMATS:
            raise SpecError(f"then_export.formats[{index}]", f"must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    try:
        check_bench_spec(spec.then_export.then_bench, "then_export.then_bench.")
    except NestedSpecError as err:
        raise SpecError(err.field, err.reason) from None
    values: dict[str, object] = {
        "tokenizer": spec.tokenizer or None,
        "max_steps": spec.max_steps or None,
        "batch_size": spec.batch_size or None,
        "lr": spec.learning_rate or None,
        "eval_interval": spec.eval_interval or None,
        "seed": spec.seed or None,
        "device": spec.device or None,
        "name": spec.model_name or None,
    }
    explicit = {k: v for k, v in values.items() if v is not None}
    try:
        load_config(spec.preset, overrides=explicit)  # the spec's own fields alone, to blame them first
        return load_config(spec.preset, overrides={**explicit, **dict(spec.overrides)})
    except ConfigError as err:
        raise SpecError(_field_of(err.key, spec), str(err)) from err


def _field_of(key: str, spec: jobs_pb2.TrainSpec) -> str:
    if key in spec.overrides:
        return f"overrides[{key}]"
    if key in _SPEC_FIELD:
        return _SPEC_FIELD[key]
    return _BLAME.get(key, f"overrides[{key}]")
