"""The ONNX Runtime backend streams the same greedy tokens as torch, on a file made by the exporter."""

from __future__ import annotations

import shutil

import pytest

from exporter.export import export_artifact
from exporter.parity import ParitySettings
from inference_svc.engine import Engine, FinishReason
from inference_svc.ort_runner import OrtRunner, onnx_file
from inference_svc.params import make_request
from model.generate import generate_tokens
from model.sampling import SamplingParams

PROMPTS = ["to be", "or not to be: that", "t", "whether 'tis nobler", "to be", "the mind"]


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """A copy of the tiny artifact with onnx/model.onnx (fp32), onnx/model-int8.onnx and meta.json."""
    path = tmp_path_factory.mktemp("onnx-store") / tiny.model_id
    shutil.copytree(tiny.path, path)
    small = ParitySettings(
        n_prompts=1, prompt_len=8, decode_prompts=1, decode_prompt_len=4, decode_steps=4, eval_tokens=64
    )
    export_artifact(path, ["int8"], eval_text=tiny.corpus * 4, no_gate=True, settings=small)
    return path


def _run(engine, tiny, cases):
    handles = [
        engine.submit(make_request(p, s, tokenizer=tiny.tokenizer, context_len=tiny.model.config.block_size))
        for p, s in cases
    ]
    return [handle.result() for handle in handles]


def test_onnx_greedy_streams_equal_torch(tiny, exported):
    runner = OrtRunner(exported, n_slots=3)
    assert runner.path.name == "model.onnx" and runner.max_len == tiny.model.config.block_size
    # Equal prompts ("to be" twice) share prefill and decode calls; the others run at their own lengths.
    cases = [(p, SamplingParams(max_new_tokens=8 + 3 * i, temperature=0.0)) for i, p in enumerate(PROMPTS)]
    with Engine(runner, tiny.tokenizer) as engine:
        results = _run(engine, tiny, cases)
        for (prompt, params), result in zip(cases, results):
            assert list(result.token_ids) == generate_tokens(tiny.model, tiny.tokenizer.encode(prompt), params)
            assert result.finish_reason is FinishReason.LENGTH
        assert engine.stats().free_slots == 3
    assert runner.n_live == 0  # every sequence's KV arrays were dropped


def test_onnx_int8_runs_and_cancellation_drops_its_arrays(tiny, exported):
    runner = OrtRunner(exported, n_slots=2, variant="int8", threads=1)
    assert runner.path.name == "model-int8.onnx"
    with Engine(runner, tiny.tokenizer) as engine:
        (done,) = _run(engine, tiny, [("to be", SamplingParams(max_new_tokens=10, seed=3))])
        assert len(done.token_ids) == 10 and done.finish_reason is FinishReason.LENGTH
        handle = engine.submit(
            make_request("or not", SamplingParams(max_new_tokens=100), tokenizer=tiny.tokenizer, context_len=128)
        )
        handle.next_chunk()
        handle.cancel()
        assert handle.result().finish_reason is FinishReason.CANCELLED
        assert engine.stats().free_slots == 2
    assert runner.n_live == 0


def test_missing_variant_says_how_to_export(tiny, exported):
    with pytest.raises(FileNotFoundError, match=r"no ONNX file for variant 'int4'.*model-int8.onnx.*tinylm export"):
        onnx_file(exported, "int4")
    with pytest.raises(FileNotFoundError, match="found: none"):
        onnx_file(tiny.path, "fp32")
