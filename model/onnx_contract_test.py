"""The contract module: names in graph order, file names, and no dependencies beyond the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from model import onnx_contract as contract


def test_names_in_graph_order():
    assert contract.input_names(2) == ["input_ids", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert contract.output_names(1) == ["logits", "present_key_0", "present_value_0"]
    assert contract.VARIANT_FILES == {
        "fp32": "model.onnx", "fp16": "model-fp16.onnx", "int8": "model-int8.onnx", "int4": "model-int4.onnx",
    }  # fmt: skip
    assert contract.fixed_kv_input_names(1) == ["input_ids", "past_lengths", "cache_key_0", "cache_value_0"]
    assert contract.fixed_kv_output_names(1) == ["logits", "new_key_0", "new_value_0"]
    assert set(contract.FIXED_KV_FILES) == set(contract.VARIANT_FILES)
    assert not set(contract.FIXED_KV_FILES.values()) & set(contract.VARIANT_FILES.values())  # the old names stay
    assert contract.SMALL_BATCH_FILES == {"int8": "model-fixedkv-int8-small-batch.onnx"}  # INT8 only (PERF_NOTES 14)
    names = [*contract.VARIANT_FILES.values(), *contract.FIXED_KV_FILES.values(), *contract.SMALL_BATCH_FILES.values()]
    assert len(set(names)) == len(names)


def test_imports_only_the_standard_library():
    tree = ast.parse(Path(contract.__file__).read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names)


def test_read_meta(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "meta.json").write_text('{"n_layer": 3}')
    assert contract.read_meta(tmp_path) == {"n_layer": 3}


def test_cache_capacity_doubles_from_32_up_to_max_len():
    assert [contract.cache_capacity(n, 256) for n in (0, 1, 32, 33, 64, 65, 200, 256)] == [
        32,
        32,
        32,
        64,
        64,
        128,
        256,
        256,
    ]
    assert contract.cache_capacity(90, 100) == 100 and contract.cache_capacity(3, 24) == 24
