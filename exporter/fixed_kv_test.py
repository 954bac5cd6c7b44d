"""The fixed-KV ONNX graph (issue 17): rows at different lengths in one call give the torch model's logits and the
past -> present graph's K/V, on models whose attention is sharp (scaled q/k: random init can hide a wrong mask)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from exporter.conftest import GPT2_TINY, LLAMA_TINY
from exporter.onnx_export import check_contract, export_fp32
from exporter.onnx_runner import FixedKVOnnxDecoder, OnnxDecoder, open_decoder
from model.transformer import GPT

MODDED_TINY = GPT2_TINY.replace(qk_norm=True, mlp="relu2", tie_weights=False)
ATOL = 1e-4  # the fp32 gate's limit


def _sharp(config) -> GPT:
    """A random-init model whose attention is peaked and weighty like a trained one's: q, k and o projections scaled
    up."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(6.0)
            block.attn.k_proj.weight.mul_(6.0)
            block.attn.o_proj.weight.mul_(20.0)  # and weighty: what attention returns moves the logits
    return model


@pytest.fixture(scope="module", params=[LLAMA_TINY, GPT2_TINY, MODDED_TINY], ids=["llama-gqa", "gpt2", "modded"])
def graphs(request, tmp_path_factory):
    """(model, fixed-KV file, past -> present file)."""
    model = _sharp(request.param)
    folder = tmp_path_factory.mktemp("fixed-kv")
    export_fp32(model, folder / "fixed.onnx", fixed_kv=True)
    export_fp32(model, folder / "model.onnx")
    return model, folder / "fixed.onnx", folder / "model.onnx"


def test_graph_interface_is_the_fixed_kv_contract(graphs):
    model, fixed, _ = graphs
    proto = onnx.load(str(fixed))
    check_contract(proto, model, fixed_kv=True)
    assert isinstance(open_decoder(fixed, threads=1), FixedKVOnnxDecoder)
    # The buffers are only read (scores and weighted values), never concatenated or copied into a present.
    buffers = {i.name for i in proto.graph.input if i.name.startswith("cache_")}
    assert {n.op_type for n in proto.graph.node if buffers & set(n.input)} <= {"MatMul", "Transpose", "Shape"}


def test_rows_at_different_lengths_match_torch_and_the_old_graph(graphs):
    """Right-padded prefill of 4 and 7 tokens, then a 2-token chunk and two single tokens, each row at its own
    position in one call: logits equal the full forward's, new K/V equal the old graph's presents."""
    model, fixed, old = graphs
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)[0].numpy()  # (2, 11, V)
    decoder = open_decoder(fixed, threads=1)
    past = decoder.empty_past(2, capacity=16)
    lengths = [4, 7]
    prompt = ids[:, :7].numpy().copy()
    prompt[0, 4:] = 0  # right padding: row 0's padded tokens are dropped below
    logits, *new = decoder.session.run(None, dict(zip(decoder._inputs, [prompt, past.lengths, *past.buffers])))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b, :n], expected[b, :n], atol=ATOL, rtol=0)
        for buffer, rows in zip(past.buffers, new):
            buffer[b, :, :n] = rows[b, :, :n]
    past.lengths = np.array(lengths)
    for width in (2, 1, 1):
        chunk = np.stack([ids[b, n : n + width].numpy() for b, n in enumerate(past.lengths)])
        starts = past.lengths.copy()
        logits, past = decoder.step(chunk, past)
        for b, n in enumerate(starts):
            np.testing.assert_allclose(logits[b], expected[b, n : n + width], atol=ATOL, rtol=0)
    # The buffers now hold what the past -> present graph hands back for each row's whole sequence.
    for b, n in enumerate(past.lengths):
        _, present = OnnxDecoder(old, threads=1).prefill(ids[b : b + 1, :n].numpy())
        for buffer, want in zip(past.buffers, present):
            np.testing.assert_allclose(buffer[b : b + 1, :, :n], want, atol=1e-5, rtol=0)


def test_attention_reads_the_past(graphs):
    """The past buffer decides the logits (the masked past is not ignored): a decode step over a zeroed buffer
    differs clearly from one over the real past."""
    model, fixed, _ = graphs
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2)).numpy()
    decoder = open_decoder(fixed, threads=1)
    _, past = decoder.prefill(ids[:, :8])
    real, _ = decoder.step(ids[:, 8:], past)
    zeroed = decoder.empty_past(1)
    zeroed.lengths = np.array([8])
    blind, _ = decoder.step(ids[:, 8:], zeroed)
    assert np.abs(real - blind).max() > 1e3 * ATOL  # 0.1: a wrong past would fail the parity tests by far
