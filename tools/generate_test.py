"""The generate client turns flags into a GenerateRequest that keeps 'unset' apart from 0."""

from protos import inference_pb2
from tools.generate import build_request, parser


def test_unset_temperature_and_seed_stay_unset():
    req = build_request("ROMEO:", parser().parse_args(["ROMEO:"]))
    assert req.prompt == "ROMEO:"
    assert not req.params.has_temperature and not req.params.has_seed
    assert req.params.max_new_tokens == 200
    assert not req.HasField("model")


def test_greedy_seed_stops_and_model_are_carried():
    args = parser().parse_args(
        [
            "x",
            "--temperature",
            "0",
            "--seed",
            "0",
            "--stop",
            "\n\n",
            "--stop",
            "END",
            "--model",
            "abc123",
            "--top-k",
            "5",
        ]
    )
    req = build_request("x", args)
    assert req.params.has_temperature and req.params.temperature == 0.0
    assert req.params.has_seed and req.params.seed == 0
    assert list(req.params.stop) == ["\n\n", "END"]
    assert req.model.id == "abc123" and req.params.top_k == 5
    assert inference_pb2.GenerateRequest.FromString(req.SerializeToString()) == req


class _Stub:
    def __init__(self, chunks):
        self.chunks = chunks

    def Generate(self, request):
        return iter(self.chunks)


def test_json_is_one_object_with_the_reason_by_name_and_the_error(capsys):
    """Issue 22 finding 7: --json printed the streamed text before the JSON, the reason as a bare integer, and never
    the error text."""
    import json

    from tools.generate import _one

    chunks = [
        inference_pb2.GenerateResponse(text="to "),
        inference_pb2.GenerateResponse(
            text="be",
            finish_reason=inference_pb2.FINISH_REASON_ERROR,
            error="RuntimeError: boom",
            usage={"completion_tokens": 2},
        ),
    ]
    assert _one(_Stub(chunks), "x", parser().parse_args(["x", "--json"])) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == {
        "text": "to be",
        "finish_reason": "error",
        "completion_tokens": 2,
        "error": "RuntimeError: boom",
    }
    chunks[-1].finish_reason, chunks[-1].error = inference_pb2.FINISH_REASON_LENGTH, ""
    assert _one(_Stub(chunks), "x", parser().parse_args(["x"])) == 0
    captured = capsys.readouterr()
    assert captured.out == "to be" and "length" in captured.err
