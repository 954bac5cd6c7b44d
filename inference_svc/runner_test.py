"""The torch runner's batched prefill/decode over slots equals the plain full forward of each sequence."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from inference_svc.runner import TorchRunner, batch_buckets


def _last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, -1]


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


def test_ragged_prefill_then_decode_at_different_positions(tiny):
    model = tiny.model
    runner = TorchRunner(model, n_slots=4)
    assert runner.max_len == model.config.block_size and runner.vocab_size == model.config.vocab_size
    prompts = {3: [1, 2, 3, 4, 5, 6], 0: [7], 2: [8, 9, 10]}  # slot -> prompt, ragged, slots out of order
    logits = runner.prefill(list(prompts), list(prompts.values()))
    assert logits.shape == (3, model.config.vocab_size) and logits.dtype == torch.float32
    for row, ids in enumerate(prompts.values()):
        torch.testing.assert_close(logits[row], _last_logits(model, ids), rtol=1e-4, atol=1e-4)
    # Two decode steps; slot 0 sits out the second one (it finished), the others go on.
    for step, slots in enumerate(([3, 0, 2], [2, 3])):
        tokens = [(11 + step + s) % model.config.vocab_size for s in slots]
        positions = [len(prompts[s]) for s in slots]
        logits = runner.decode(slots, tokens, positions)
        for row, (slot, token) in enumerate(zip(slots, tokens)):
            prompts[slot] = prompts[slot] + [token]
            torch.testing.assert_close(logits[row], _last_logits(model, prompts[slot]), rtol=1e-4, atol=1e-4)


def test_reused_slot_does_not_see_the_previous_sequence(tiny):
    runner = TorchRunner(tiny.model, n_slots=1)
    runner.prefill([0], [[1, 2, 3, 4, 5, 6, 7, 8]])
    runner.release(0)
    logits = runner.prefill([0], [[9, 10]])
    torch.testing.assert_close(logits[0], _last_logits(tiny.model, [9, 10]), rtol=1e-4, atol=1e-4)
    logits = runner.decode([0], [11], [2])
    torch.testing.assert_close(logits[0], _last_logits(tiny.model, [9, 10, 11]), rtol=1e-4, atol=1e-4)


def test_cuda_graphs_need_cuda(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU test below covers graphs")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        TorchRunner(tiny.model, n_slots=2, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager(tiny):
    eager = TorchRunner(tiny.copy(), n_slots=6, device="cuda", cuda_graphs=False)
    graphs = TorchRunner(tiny.copy(), n_slots=6, device="cuda", cuda_graphs=True)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    for runner in (eager, graphs):
        runner.prefill([0, 1, 5], prompts)
    for step in range(3):  # 3 rows pad to the bucket of 4
        tokens, positions = [10 + step] * 3, [len(p) + step for p in prompts]
        a = eager.decode([0, 1, 5], tokens, positions)
        b = graphs.decode([0, 1, 5], tokens, positions)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_runner_holds_the_fused_weights_its_graphs_read(tiny):
    """A later fuse_qkv over changed weights makes new copies; the runner still holds the ones it started with (a CUDA
    graph reads them by address and keeps no reference of its own)."""
    model = copy.deepcopy(tiny.model)
    runner = TorchRunner(model, n_slots=2)
    first = [weakref.ref(block.attn.qkv[0]) for block in model.blocks]
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight.add_(1.0)  # in place: the copy is stale now
    model.fuse_qkv()
    assert model.blocks[0].attn.qkv[0] is not first[0]()  # a new copy was made
    assert all(ref() is not None for ref in first) and runner._fused[0][0] is first[0]()


def test_multi_step_max_batch_is_checked_and_kept(tiny):
    with pytest.raises(ValueError, match="multi_step_max_batch must be an integer >= 0, got -1"):
        TorchRunner(tiny.model, n_slots=2, multi_step_max_batch=-1)
    assert TorchRunner(tiny.model, n_slots=2, multi_step_max_batch=256).multi_step_max_batch == 256
