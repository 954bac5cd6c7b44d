"""The ONNX Runtime backend streams the same greedy tokens as torch, on a file made by the exporter."""

from __future__ import annotations

import shutil

import pytest
import torch

from exporter.export import export_artifact
from exporter.parity import ParitySettings
from inference_svc.engine import Engine, FinishReason
from inference_svc import ort_runner
from inference_svc.ort_runner import SMALL_BATCH_MAX_TOKENS, OrtRunner, onnx_file
from inference_svc.params import make_request
from model import onnx_contract as contract
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


@pytest.mark.parametrize("fixed_kv", [False, True], ids=["past-present", "fixed-kv"])
def test_onnx_greedy_streams_equal_torch(tiny, exported, fixed_kv):
    runner = OrtRunner(exported, n_slots=3, fixed_kv=fixed_kv)
    assert runner.fixed_kv is fixed_kv and runner.max_len == tiny.model.config.block_size
    assert runner.path.name == ("model-fixedkv.onnx" if fixed_kv else "model.onnx")
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
    assert runner.path.name == "model-fixedkv-int8.onnx"  # the fixed-KV graph, when the export made one
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


def _greedy(tiny, prompt_ids, n):
    """Torch's greedy continuation of `prompt_ids`: n tokens."""
    return generate_tokens(tiny.model, prompt_ids, SamplingParams(max_new_tokens=n, temperature=0.0))


def test_fixed_kv_runs_rows_at_different_lengths_in_one_call_and_reuses_released_slots(tiny, exported):
    """Slots 0, 3 and 1 (a gap at 2) prefill prompts of three lengths in one call, then decode together each step at
    their own positions; slot 3 is released mid-way and reused for a new prompt. Tokens equal torch's greedy ones."""
    runner = OrtRunner(exported, n_slots=4, fixed_kv=True, threads=1)
    calls = []
    run = runner.session.run
    runner.session.run = lambda *a, **k: calls.append(1) or run(*a, **k)  # count ORT calls
    prompts = {slot: tiny.tokenizer.encode(p) for slot, p in zip((0, 3, 1), ("to be", "or not to be: that", "t"))}
    got = {slot: [int(t)] for slot, t in zip(prompts, runner.prefill(list(prompts), list(prompts.values())).argmax(-1))}
    want = {slot: _greedy(tiny, ids, 12) for slot, ids in prompts.items()}
    for step in range(11):
        if step == 5:  # slot 3's sequence ends; a new one takes the slot
            assert got[3] == want[3][:6]
            runner.release(3)
            assert runner.n_live == 2
            prompts[3] = tiny.tokenizer.encode("whether 'tis")
            want[3], got[3] = _greedy(tiny, prompts[3], 7), [int(runner.prefill([3], [prompts[3]]).argmax(-1))]
        slots = list(got)
        positions = [len(prompts[s]) + len(got[s]) - 1 for s in slots]
        logits = runner.decode(slots, [got[s][-1] for s in slots], positions)
        for slot, token in zip(slots, logits.argmax(-1).tolist()):
            got[slot].append(token)
    assert got == want and len(got[3]) == 7
    assert runner._pool[0].shape == (4, runner.n_kv_head, 32, runner.head_dim)  # the pool's capacity: 32 positions
    assert len(calls) == 1 + 1 + 11  # one call per step, whatever the rows' positions
    for slot in (0, 1, 3):
        runner.release(slot)
    assert runner.n_live == 0


@pytest.mark.parametrize("fixed_kv", [False, True], ids=["past-present", "fixed-kv"])
def test_context_past_max_len_names_the_limit(tiny, exported, fixed_kv):
    runner = OrtRunner(exported, n_slots=1, fixed_kv=fixed_kv, threads=1)
    limit = runner.max_len
    with pytest.raises(ValueError, match=rf"slot 0: {limit + 1} tokens exceed max_len {limit} \(the model's block"):
        runner.prefill([0], [[1] * (limit + 1)])
    runner.prefill([0], [[1] * limit])
    assert not fixed_kv or runner._pool[0].shape[2] == limit  # grown to max_len ...
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens exceed max_len {limit}"):
        runner.decode([0], [1], [limit])
    runner.release(0)
    assert not fixed_kv or runner._pool[0].shape[2] == 32  # ... and back when the sequence is gone


def test_missing_variant_says_how_to_export(tiny, exported):
    with pytest.raises(FileNotFoundError, match=r"no ONNX file for variant 'int4'.*model-int8.onnx.*tinylm export"):
        onnx_file(exported, "int4")
    with pytest.raises(FileNotFoundError, match="found: none"):
        onnx_file(tiny.path, "fp32")


def test_int8_small_calls_run_on_the_small_batch_twin(tiny, exported):
    """INT8 (PERF_NOTES 14): calls of at most SMALL_BATCH_MAX_TOKENS token rows run on the fixed-KV graph's
    weight-only 8-bit twin, the rest on the fixed-KV INT8 file, both over one pool. Fed torch's greedy tokens, each
    call's logits stay within INT8 error of torch's and pick torch's next token."""
    runner = OrtRunner(exported, n_slots=3, variant="int8", threads=1, small_batch=True)  # True: whatever it measures
    assert runner.small_batch_path.name == contract.SMALL_BATCH_FILES["int8"] and SMALL_BATCH_MAX_TOKENS == 2
    calls = []
    for name, session in (("small", runner.small_batch_session), ("int8", runner.session)):
        session.run = lambda *a, _run=session.run, _name=name, **k: calls.append(_name) or _run(*a, **k)
    prompts = [tiny.tokenizer.encode(p) for p in ("t", "to be", "or not to be: that")]  # 1, 5, 18 tokens
    want = [_greedy(tiny, ids, 8) for ids in prompts]
    errors, agree = [], []

    def check(logits, rows):
        for row, (slot, step) in zip(logits, rows):
            ids = torch.tensor([prompts[slot] + want[slot][:step]])
            with torch.no_grad():
                expected = tiny.model(ids)[0][0, -1]
            errors.append(float((row - expected).abs().max()))
            agree.append(int(row.argmax()) == want[slot][step])

    for slot, ids in enumerate(prompts):
        check(runner.prefill([slot], [ids]), [(slot, 0)])
    assert calls == ["small", "int8", "int8"]  # 1 token row, then 5 and 18
    made = [1, 1, 1]  # tokens predicted per slot (the prefill's first)
    for slots in [[0]] * 2 + [[0, 1]] * 2 + [[0, 1, 2]] * 3:  # 1 row, a span of 2 rows, 3 rows
        positions = [len(prompts[s]) + made[s] - 1 for s in slots]
        logits = runner.decode(slots, [want[s][made[s] - 1] for s in slots], positions)
        check(logits, [(s, made[s]) for s in slots])
        for s in slots:
            made[s] += 1
    assert calls[3:] == ["small"] * 2 + ["small"] * 2 + ["int8"] * 3
    assert max(errors) < 0.1 and sum(agree) / len(agree) >= 0.9, (max(errors), agree)
    for slot in range(3):
        runner.release(slot)
    assert runner.n_live == 0
    assert OrtRunner(exported, n_slots=1, variant="int8", small_batch=False).small_batch_session is None
    with pytest.raises(FileNotFoundError, match=r"no small-batch fixed-KV graph for variant 'fp32'.*tinylm export"):
        OrtRunner(exported, n_slots=1, variant="fp32", small_batch=True)


@pytest.mark.parametrize("twin_ms, file_ms, kept", [(0.5, 0.6, True), (15.0, 0.6, False), (0.6, 0.6, False)])
def test_by_default_the_twin_is_kept_only_where_it_is_faster(tiny, exported, monkeypatch, twin_ms, file_ms, kept):
    """small_batch None: the runner times a one-token call on the twin and on the fixed-KV INT8 file at start and
    drops the twin unless it is the faster (on a CPU without ORT's int8 MatMulNBits kernel it runs ~30x slower).
    The timing here is replaced by fixed figures, one per file; the calls themselves are real."""
    seen = []

    def fake_call_ms(session, outputs, feed):
        logits, *new = session.run(outputs, feed)  # the feed the check builds is a valid one-token call
        assert logits.shape[:2] == (1, 1) and all(n.shape[2] == 1 for n in new)
        seen.append(session)
        return twin_ms if len(seen) == 1 else file_ms

    monkeypatch.setattr(ort_runner, "_call_ms", fake_call_ms)
    runner = OrtRunner(exported, n_slots=2, variant="int8", threads=1)
    assert runner.small_batch_check == (twin_ms, file_ms) and seen[1] is runner.session
    assert (runner.small_batch_session is not None) == kept and (runner.small_batch_path is not None) == kept
    assert not runner._pool[0].any()  # the check wrote nothing into the cache
    monkeypatch.undo()
    forced = OrtRunner(exported, n_slots=1, variant="int8", threads=1, small_batch=True)
    assert forced.small_batch_check is None and forced.small_batch_session is not None  # True: no check, kept
