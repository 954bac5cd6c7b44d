"""The ORT step-by-position comparison at toy sizes (figures are not checked, only that every graph ran every run)."""

from __future__ import annotations

from bench_svc.benches.ort_kv_positions import GRAPHS, WINDOW, compare, export_int8
from model.presets import get_preset
from model.tokenizers import CharTokenizer


def test_every_graph_is_timed_over_both_windows(tmp_path, one_thread):
    tokenizer = CharTokenizer.from_corpus("to be, or not to be: ROMEO")
    config = get_preset("shakespeare-char", n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=96, dropout=0.0)
    path = export_int8(tmp_path, config, tokenizer)
    result = compare(path, tokenizer.encode("ROMEO:"), end=96 - 26, runs=2, threads=1)
    assert list(result) == list(GRAPHS) and 96 - 26 - 6 >= 2 * WINDOW  # two windows apart
    for windows in result.values():
        assert all(len(ms) == 2 and min(ms) > 0 for ms in windows.values())
