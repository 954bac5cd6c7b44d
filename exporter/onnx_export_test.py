"""The ONNX graph keeps the contract: names, dynamic axes, positions past + t, empty past, batches; fp16 runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from model import onnx_contract as contract
from exporter.conftest import GPT2_TINY, LLAMA_TINY
from exporter.decoder_graphs import ExplicitKVDecoder
from exporter.onnx_export import convert_fp16, export_fp32
from exporter.onnx_quantize import fold_constant_transposes
from exporter.onnx_runner import OnnxDecoder
from model.transformer import GPT


# modded: shakespeare-char-muon's flavour (QK-norm, ReLU² MLP, untied head)
MODDED_TINY = GPT2_TINY.replace(qk_norm=True, mlp="relu2", tie_weights=False)


@pytest.fixture(scope="module", params=[LLAMA_TINY, GPT2_TINY, MODDED_TINY], ids=["llama-gqa", "gpt2", "modded"])
def exported_graph(request, tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(request.param).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_fp32(model, path)
    return model, path


def test_graph_interface_is_the_contract(exported_graph):
    model, path = exported_graph
    c = model.config
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == contract.input_names(c.n_layer)
    assert [o.name for o in proto.graph.output] == contract.output_names(c.n_layer)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(proto.graph.input[0]) == ["batch", "seq"]
    assert dims(proto.graph.input[1]) == ["batch", c.n_kv_head, "past", c.head_dim]
    logits = dims(proto.graph.output[0])
    assert logits[0] == "batch" and logits[2] == c.vocab_size


def test_prefill_from_empty_past_matches_the_full_forward(exported_graph):
    model, path = exported_graph
    decoder = OnnxDecoder(path, threads=1)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    logits, present = decoder.prefill(ids.numpy())
    with torch.no_grad():
        expected = model(ids)[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert len(present) == 2 * model.config.n_layer
    assert present[0].shape == (3, model.config.n_kv_head, 11, model.config.head_dim)


def test_chunked_decode_through_present_matches_the_full_forward(exported_graph):
    """Prefill 5, then a 3-token chunk, then single tokens: positions must continue at past + t."""
    model, path = exported_graph
    decoder = OnnxDecoder(path, threads=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(ids)[0].numpy()
    got, past = decoder.prefill(ids[:, :5].numpy())
    chunks = [got]
    for lo, hi in ((5, 8), (8, 9), (9, 10), (10, 12)):
        got, past = decoder.step(ids[:, lo:hi].numpy(), past)
        chunks.append(got)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), expected, atol=1e-4, rtol=0)


def test_presents_equal_the_torch_wrapper(exported_graph):
    model, path = exported_graph
    c = model.config
    past = [
        (torch.randn(2, c.n_kv_head, 4, c.head_dim), torch.randn(2, c.n_kv_head, 4, c.head_dim))
        for _ in range(c.n_layer)
    ]
    ids = torch.randint(0, c.vocab_size, (2, 3))
    with torch.no_grad():
        logits, present = ExplicitKVDecoder(model)(ids, past)
    got, got_present = OnnxDecoder(path, threads=1).step(ids.numpy(), [t.numpy() for kv in past for t in kv])
    np.testing.assert_allclose(got, logits.numpy(), atol=1e-4, rtol=0)
    for i, (k, v) in enumerate(present):
        np.testing.assert_allclose(got_present[2 * i], k.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_present[2 * i + 1], v.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got_present[2 * i][:, :, :4], past[i][0].numpy())  # the past is kept as is


def test_fp16_keeps_float32_io_and_stays_close(exported_graph, tmp_path):
    model, path = exported_graph
    convert_fp16(path, tmp_path / "fp16.onnx")
    fp16 = OnnxDecoder(tmp_path / "fp16.onnx", threads=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 9)).numpy()
    logits, present = fp16.prefill(ids)
    assert logits.dtype == np.float32 and present[0].dtype == np.float32
    reference = OnnxDecoder(path, threads=1).prefill(ids)[0]
    assert 0 < np.abs(logits - reference).max() < 1e-2  # fp16 rounding: visible, small


def test_fold_constant_transposes_leaves_the_tied_head_a_constant(exported_graph):
    """The exporter may fold the head's transpose itself (small tensors) or not (vocab 50k); after
    fold_constant_transposes it is a constant either way, so the quantizers can take it."""
    model, path = exported_graph
    proto = onnx.load(str(path))
    constant_transposes = lambda: sum(  # noqa: E731
        n.op_type == "Transpose" and n.input[0] in {i.name for i in proto.graph.initializer} for n in proto.graph.node
    )
    before = constant_transposes()
    assert fold_constant_transposes(proto) == before and constant_transposes() == 0
    head = model.lm_head.weight.detach().numpy().T  # (C, V)
    assert any(
        list(i.dims) == list(head.shape) and np.array_equal(onnx.numpy_helper.to_array(i), head)
        for i in proto.graph.initializer
    )
    onnx.checker.check_model(proto)


def test_fold_constant_transposes_folds_a_transpose_node():
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            onnx.helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    proto = onnx.helper.make_model(graph)
    assert fold_constant_transposes(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["MatMul"]
    folded = next(i for i in proto.graph.initializer if i.name == "wt")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded), weight.T)
