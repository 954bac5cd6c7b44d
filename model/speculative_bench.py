"""Kept only until inference_svc/ moves over: the speculative-decoding benchmark is now
`bench_svc/benches/speculative.py` (`python -m bench_svc.benches.speculative`; issue 19: model/ holds no benchmark).
Re-exports, defines nothing.

Still imported by: inference_svc/speculative_bench.py. Delete this file (and its target in model/BUILD) when it
imports `bench_svc.benches.speculative`.
"""

from bench_svc.benches.speculative import (
    DRAFT_PRESET,
    MODES,
    TARGET_PRESET,
    build_parser,
    format_table,
    held_out_prompts,
    make_header,
    result_row,
    trained_models,
    write_results,
)

__all__ = ["DRAFT_PRESET", "MODES", "TARGET_PRESET", "build_parser", "format_table", "held_out_prompts",
           "make_header", "result_row", "trained_models", "write_results"]
