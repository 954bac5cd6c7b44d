"""The request: one validated object (prompt token ids + `model.sampling.SamplingParams` + truncation),
built once at the edge from Python values or from the wire (`protos/inference.proto`).

Every error is a `RequestError` naming the field (as the wire spells it: `params.top_p`, `prompt`) and the
allowed range, so the gRPC layer can answer INVALID_ARGUMENT without knowing the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from model.field_checks import FieldError, is_int
from model.sampling import SamplingParams
from model.tokenizers import Tokenizer
from protos import inference_pb2

__all__ = [
    "Request",
    "RequestError",
    "TRUNCATIONS",
    "make_request",
    "make_sampling_params",
    "sampling_params_from_proto",
    "request_from_proto",
]

TRUNCATIONS = ("none", "left")
MAX_REQUEST_ID_LEN = 256
DEFAULT_MAX_NEW_TOKENS = SamplingParams().max_new_tokens


class RequestError(ValueError):
    """A bad request: `field` is its wire name, the message says the allowed range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True)
class Request:
    """A generation request the engine accepts as is: the prompt already tokenized and fitted to the context."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    request_id: str = ""  # empty: the engine makes one
    truncated: int = 0  # prompt tokens dropped from the left to fit the context


def make_request(
    prompt: str | Sequence[int],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer,
    context_len: int,
    truncation: str = "none",
    request_id: str = "",
) -> Request:
    """Tokenize (when `prompt` is text) and check the prompt against the context; `truncation="left"` keeps
    the last `context_len` tokens of a prompt that is too long instead of refusing it."""
    if truncation not in TRUNCATIONS:
        raise RequestError("truncation", f"must be one of {list(TRUNCATIONS)}, got {truncation!r}")
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_LEN:
        raise RequestError("request_id", f"must be a string of at most {MAX_REQUEST_ID_LEN} characters")
    if params.max_new_tokens > context_len:
        raise RequestError(
            "params.max_new_tokens", f"must be in [1, {context_len}] (the context length), got {params.max_new_tokens}"
        )
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt)
        except ValueError as err:
            raise RequestError("prompt", str(err)) from None
    else:
        ids = list(prompt)
        bad = [i for i in ids if not is_int(i) or not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise RequestError("prompt", f"token ids must be in [0, {tokenizer.vocab_size}), got {bad[:5]}")
    if not ids:
        raise RequestError("prompt", "must hold at least 1 token")
    dropped = max(0, len(ids) - context_len)
    if dropped and truncation == "none":
        raise RequestError(
            "prompt",
            f"{len(ids)} tokens exceed the context length {context_len}; shorten it or ask for left truncation",
        )
    return Request(prompt_ids=tuple(ids[dropped:]), params=params, request_id=request_id, truncated=dropped)


def sampling_params_from_proto(
    msg: inference_pb2.SamplingParameters,
    *,
    prefix: str = "params",
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> SamplingParams:
    """Translate the wire's SamplingParameters, where 0 means "default" for max_new_tokens, top_p and
    repetition_penalty, and temperature/seed count as unset unless their `has_` flag (or a non-zero value)
    says otherwise."""
    if msg.max_new_tokens < 0:
        raise RequestError(
            f"{prefix}.max_new_tokens", f"must be >= 1 (0 = default {default_max_new_tokens}), got {msg.max_new_tokens}"
        )
    if msg.seed < 0:
        raise RequestError(f"{prefix}.seed", f"must be in [0, 2**63 - 1], got {msg.seed}")
    kwargs = dict(
        max_new_tokens=msg.max_new_tokens or default_max_new_tokens,
        temperature=float(msg.temperature) if (msg.has_temperature or msg.temperature != 0) else 1.0,
        top_k=msg.top_k,
        top_p=float(msg.top_p) if msg.top_p != 0 else 1.0,
        repetition_penalty=float(msg.repetition_penalty) if msg.repetition_penalty != 0 else 1.0,
        seed=msg.seed if (msg.has_seed or msg.seed != 0) else None,
        stop=tuple(msg.stop),
    )
    return make_sampling_params(prefix=prefix, **kwargs)


def make_sampling_params(*, prefix: str = "params", **values: object) -> SamplingParams:
    """`SamplingParams(**values)`, its FieldError turned into a RequestError naming the field (`params.top_p`);
    every front end (gRPC, HTTP) builds its parameters through here."""
    try:
        return SamplingParams(**values)
    except FieldError as err:
        raise RequestError(f"{prefix}.{err.field}", str(err)) from None
    except ValueError as err:
        raise RequestError(prefix, str(err)) from None


def request_from_proto(
    msg: inference_pb2.GenerateRequest, *, tokenizer: Tokenizer, context_len: int, prefix: str = ""
) -> Request:
    """A `Request` from a GenerateRequest (`prefix` names it inside a batch: `requests[3].`)."""
    try:
        truncation = {inference_pb2.TRUNCATION_NONE: "none", inference_pb2.TRUNCATION_LEFT: "left"}[msg.truncation]
    except KeyError:
        raise RequestError(
            f"{prefix}truncation", f"must be TRUNCATION_NONE or TRUNCATION_LEFT, got {msg.truncation}"
        ) from None
    default_max = min(DEFAULT_MAX_NEW_TOKENS, context_len)
    params = sampling_params_from_proto(msg.params, prefix=f"{prefix}params", default_max_new_tokens=default_max)
    try:
        return make_request(
            msg.prompt,
            params,
            tokenizer=tokenizer,
            context_len=context_len,
            truncation=truncation,
            request_id=msg.request_id,
        )
    except RequestError as err:
        raise RequestError(prefix + err.field, err.reason) from None
