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
    args = parser().parse_args(["x", "--temperature", "0", "--seed", "0", "--stop", "\n\n", "--stop", "END",
                                "--model", "abc123", "--top-k", "5"])
    req = build_request("x", args)
    assert req.params.has_temperature and req.params.temperature == 0.0
    assert req.params.has_seed and req.params.seed == 0
    assert list(req.params.stop) == ["\n\n", "END"]
    assert req.model.id == "abc123" and req.params.top_k == 5
    assert inference_pb2.GenerateRequest.FromString(req.SerializeToString()) == req
