"""Kept only until trainer/ and inference_svc/ move over: the provenance helpers now live in `bench_svc.provenance`
(issue 19: no library package computes provenance). Re-exports, defines nothing.

Still imported by: trainer/bench_output.py (git_commit), inference_svc/bench.py (device_name, git_commit),
inference_svc/speculative_bench.py (git_commit). Delete this file when they import `bench_svc.provenance`.
"""

from bench_svc.provenance import COMMIT_ENV, cpu_device_name, device_name, git_commit

__all__ = ["COMMIT_ENV", "cpu_device_name", "device_name", "git_commit"]
