"""Job kinds and states: parsing what callers pass (enum values or names) and naming them back."""

from typing import Union

from google.protobuf.message import Message

from protos import jobs_pb2

__all__ = [
    "FINAL_STATES",
    "KIND_NAMES",
    "KindLike",
    "StateLike",
    "kind_name",
    "parse_kind",
    "parse_state",
    "spec_type",
    "state_name",
]

KindLike = Union[int, str]
StateLike = Union[int, str]

# The short name is the stream suffix (tinylm:jobs:<name>) and also the Job.spec oneof field.
KIND_NAMES: dict[int, str] = {
    jobs_pb2.JOB_KIND_TRAIN: "train",
    jobs_pb2.JOB_KIND_EXPORT: "export",
    jobs_pb2.JOB_KIND_BENCH: "bench",
    jobs_pb2.JOB_KIND_NOOP: "noop",
}
_SPEC_TYPES: dict[int, type[Message]] = {
    jobs_pb2.JOB_KIND_TRAIN: jobs_pb2.TrainSpec,
    jobs_pb2.JOB_KIND_EXPORT: jobs_pb2.ExportSpec,
    jobs_pb2.JOB_KIND_BENCH: jobs_pb2.BenchSpec,
    jobs_pb2.JOB_KIND_NOOP: jobs_pb2.NoopSpec,
}
_STATE_NAMES: dict[int, str] = {
    jobs_pb2.JOB_STATE_QUEUED: "queued",
    jobs_pb2.JOB_STATE_RUNNING: "running",
    jobs_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    jobs_pb2.JOB_STATE_FAILED: "failed",
    jobs_pb2.JOB_STATE_CANCELLED: "cancelled",
}
FINAL_STATES = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})


def _parse(value: Union[int, str], names: dict[int, str], enum_prefix: str, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in names:
        return value
    if isinstance(value, str):
        text = value.strip().lower().removeprefix(enum_prefix.lower())
        for number, name in names.items():
            if text == name:
                return number
    allowed = ", ".join(repr(name) for name in names.values())
    raise ValueError(f"{what} must be one of {allowed} (or the {enum_prefix}* enum value), got {value!r}")


def parse_kind(kind: KindLike) -> int:
    """A `JobKind` value from the enum value or a name ('train', 'JOB_KIND_TRAIN'); ValueError otherwise."""
    return _parse(kind, KIND_NAMES, "JOB_KIND_", "kind")


def kind_name(kind: KindLike) -> str:
    """The short name of a kind: 'train', 'export', 'bench' or 'noop'."""
    return KIND_NAMES[parse_kind(kind)]


def spec_type(kind: KindLike) -> type[Message]:
    """The spec message class a job of this kind carries."""
    return _SPEC_TYPES[parse_kind(kind)]


def parse_state(state: StateLike) -> int:
    """A `JobState` value from the enum value or a name ('queued', 'JOB_STATE_QUEUED'); ValueError otherwise."""
    return _parse(state, _STATE_NAMES, "JOB_STATE_", "state")


def state_name(state: int) -> str:
    """The short name of a state: 'queued', 'running', 'succeeded', 'failed' or 'cancelled'."""
    return _STATE_NAMES.get(state, "unspecified")
