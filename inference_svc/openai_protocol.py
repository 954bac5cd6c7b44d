"""OpenAI's completions protocol, translated: a JSON body becomes our `Request`, chunks become its JSON objects.

No rules of its own: the values go through `params.make_sampling_params` and `params.make_request`, the same
validation the gRPC service uses; only the field names change (ours `params.max_new_tokens`, OpenAI's
`max_tokens`), so a bad field is reported by the name the caller sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

from inference_svc.engine import Chunk
from inference_svc.params import DEFAULT_MAX_NEW_TOKENS, Request, RequestError, make_request, make_sampling_params
from model.tokenizers import Tokenizer

__all__ = [
    "Completion",
    "chunk_object",
    "completion_object",
    "error_body",
    "models_object",
    "now_unix",
    "parse_completion",
]

# Our field names (as params.py reports them) -> OpenAI's.
_OPENAI_NAME = {
    "params.max_new_tokens": "max_tokens",
    "params.temperature": "temperature",
    "params.top_k": "top_k",
    "params.top_p": "top_p",
    "params.repetition_penalty": "repetition_penalty",
    "params.seed": "seed",
    "params.stop": "stop",
    "params": "",
    "prompt": "prompt",
}
# OpenAI fields that take one value here: anything else for them is refused, not silently ignored.
_FIXED = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "suffix": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
_ACCEPTED = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
    *_FIXED,
}


@dataclass(frozen=True)
class Completion:
    """A parsed POST /v1/completions: the engine's request, whether to stream, the model the caller named."""

    request: Request
    stream: bool
    model: str


def parse_completion(body: Any, *, tokenizer: Tokenizer, context_len: int) -> Completion:
    """Validate a completions body; RequestError names the OpenAI field (`top_p`, `max_tokens`)."""
    if not isinstance(body, Mapping):
        raise RequestError("", "the body must be a JSON object")
    unknown = sorted(set(body) - _ACCEPTED)
    if unknown:
        raise RequestError(unknown[0], f"unrecognized request argument; accepted: {sorted(_ACCEPTED)}")
    for name, only in _FIXED.items():
        if body.get(name, only) not in (only, None):
            raise RequestError(name, f"only {only!r} is supported, got {body[name]!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"must be true or false, got {stream!r}")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise RequestError("model", f"must be a string, got {model!r}")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one prompt
    if not isinstance(prompt, (str, list)):
        raise RequestError("prompt", "must be a string or a list of token ids (one prompt per request)")
    try:
        params = make_sampling_params(
            max_new_tokens=_given(body, "max_tokens", min(DEFAULT_MAX_NEW_TOKENS, context_len)),
            temperature=_given(body, "temperature", 1.0),
            top_k=_given(body, "top_k", 0),
            top_p=_given(body, "top_p", 1.0),
            repetition_penalty=_given(body, "repetition_penalty", 1.0),
            seed=body.get("seed"),
            stop=_given(body, "stop", ()),
        )
        request = make_request(prompt, params, tokenizer=tokenizer, context_len=context_len)
    except RequestError as err:
        raise RequestError(_OPENAI_NAME.get(err.field, err.field), err.reason) from None
    return Completion(request=request, stream=stream, model=model)


def _given(body: Mapping[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def error_body(
    message: str, *, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
) -> dict:
    """OpenAI's error shape: what the `openai` client turns into `APIStatusError.body`."""
    return {"error": {"message": message, "type": kind, "param": param or None, "code": code}}


def completion_object(cid: str, created: int, model: str, chunk: Chunk) -> dict:
    """The whole (non-streamed) completion from `RequestHandle.result()`'s merged chunk."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": _finish(chunk)}],
        "usage": _usage(chunk),
    }


def chunk_object(cid: str, created: int, model: str, text: str, final: Chunk | None) -> dict:
    """One server-sent event's data: the text of a batch of tokens; the last one carries finish reason and usage."""
    out = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(final) if final else None}],
    }
    if final is not None:
        out["usage"] = _usage(final)
    return out


def models_object(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "tinylm"}]}


def now_unix() -> int:
    """OpenAI's `created`: whole seconds since the epoch."""
    return int(time.time())


def _finish(chunk: Chunk) -> str | None:
    return chunk.finish_reason.value if chunk.finish_reason is not None else None


def _usage(chunk: Chunk) -> dict | None:
    u = chunk.usage
    if u is None:
        return None
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
