"""Requests are validated once at the edge; every error names its wire field and the allowed range."""

from __future__ import annotations

import pytest

from inference_svc.params import RequestError, make_request, request_from_proto, sampling_params_from_proto
from model.sampling import SamplingParams
from model.tokenizers import CharTokenizer
from protos import inference_pb2

TOK = CharTokenizer.from_corpus("abcdefgh ")
CONTEXT = 16


def _proto(**params) -> inference_pb2.SamplingParameters:
    return inference_pb2.SamplingParameters(**params)


def test_wire_defaults_and_has_flags():
    p = sampling_params_from_proto(_proto())
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, p.stop) == (
        SamplingParams().max_new_tokens,
        1.0,
        0,
        1.0,
        1.0,
        None,
        (),
    )
    greedy = sampling_params_from_proto(_proto(temperature=0.0, has_temperature=True, seed=0, has_seed=True))
    assert greedy.temperature == 0.0 and greedy.seed == 0
    p = sampling_params_from_proto(
        _proto(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.25, repetition_penalty=1.5, seed=7, stop=["x", "yz"])
    )
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, p.stop) == (
        5,
        0.5,
        3,
        0.25,
        1.5,
        7,
        ("x", "yz"),
    )


@pytest.mark.parametrize(
    "params, field, words",
    [
        (dict(max_new_tokens=-1), "params.max_new_tokens", ">= 1"),
        (dict(temperature=-0.5, has_temperature=True), "params.temperature", "[0.01, "),
        (dict(temperature=1e-40, has_temperature=True), "params.temperature", "[0.01, 100.0]"),
        (dict(repetition_penalty=1e-40), "params.repetition_penalty", "[0.01, 10.0]"),
        (dict(top_k=-2), "params.top_k", ">= 0"),
        (dict(top_p=1.5), "params.top_p", "(0, 1]"),
        (dict(top_p=-0.1), "params.top_p", "(0, 1]"),
        (dict(repetition_penalty=-1.0), "params.repetition_penalty", "[0.01, "),
        (dict(seed=-3, has_seed=True), "params.seed", "2**63 - 1"),
        (dict(stop=["a"] * 9), "params.stop", "at most 8"),
        (dict(stop=["a", ""]), "params.stop", "1 to 256 characters"),
        (dict(temperature=float("nan"), has_temperature=True), "params.temperature", "[0.01, "),
    ],
)
def test_bad_wire_params_name_the_field(params, field, words):
    with pytest.raises(RequestError) as err:
        sampling_params_from_proto(_proto(**params))
    assert err.value.field == field and words in str(err.value) and str(err.value).startswith(field + ":")


def test_prompt_must_fit_the_context_unless_left_truncated():
    params = SamplingParams(max_new_tokens=4)
    long = "abcdefgh" * 3  # 24 tokens > 16
    with pytest.raises(RequestError, match="prompt: 24 tokens exceed the context length 16") as err:
        make_request(long, params, tokenizer=TOK, context_len=CONTEXT)
    assert err.value.field == "prompt"
    req = make_request(long, params, tokenizer=TOK, context_len=CONTEXT, truncation="left", request_id="r1")
    assert req.prompt_ids == tuple(TOK.encode(long[-16:])) and req.truncated == 8 and req.request_id == "r1"


@pytest.mark.parametrize(
    "prompt, kw, field, words",
    [
        ("", {}, "prompt", "at least 1 token"),
        ("abz", {}, "prompt", "'z'"),
        ([1, 99], {}, "prompt", "[0, 9)"),
        ("ab", {"truncation": "right"}, "truncation", "['none', 'left']"),
        ("ab", {"request_id": "x" * 300}, "request_id", "at most 256"),
    ],
)
def test_bad_requests_name_the_field(prompt, kw, field, words):
    with pytest.raises(RequestError) as err:
        make_request(prompt, SamplingParams(max_new_tokens=4), tokenizer=TOK, context_len=CONTEXT, **kw)
    assert err.value.field == field and words in err.value.reason


def test_max_new_tokens_is_bounded_by_the_context():
    with pytest.raises(RequestError, match=r"params.max_new_tokens: must be in \[1, 16\]"):
        make_request("ab", SamplingParams(max_new_tokens=17), tokenizer=TOK, context_len=CONTEXT)


def test_generate_request_translation_and_batch_prefix():
    msg = inference_pb2.GenerateRequest(
        prompt="abc", request_id="q", truncation=inference_pb2.TRUNCATION_LEFT, params=_proto(max_new_tokens=3, top_k=2)
    )
    req = request_from_proto(msg, tokenizer=TOK, context_len=CONTEXT)
    assert req.prompt_ids == tuple(TOK.encode("abc")) and req.params.top_k == 2 and req.request_id == "q"
    # An unset max_new_tokens defaults to 64, capped at the context length.
    assert (
        request_from_proto(
            inference_pb2.GenerateRequest(prompt="a"), tokenizer=TOK, context_len=CONTEXT
        ).params.max_new_tokens
        == 16
    )
    bad = inference_pb2.GenerateRequest(prompt="abc", params=_proto(top_p=2.0))
    with pytest.raises(RequestError) as err:
        request_from_proto(bad, tokenizer=TOK, context_len=CONTEXT, prefix="requests[2].")
    assert err.value.field == "requests[2].params.top_p"
    with pytest.raises(RequestError) as err:
        request_from_proto(
            inference_pb2.GenerateRequest(prompt=""), tokenizer=TOK, context_len=CONTEXT, prefix="requests[0]."
        )
    assert err.value.field == "requests[0].prompt"
