#!/usr/bin/env bash
# The kernels' whole GPU check in one go, for the GPU machine: build the CUDA RMSNorm extension for this Python,
# run the kernel tests on the GPU, then the benchmark (bench_svc/results/kernels-<gpu>.{csv,json,png}; the short
# table is printed last). Keeps going after a failed step and exits non-zero if any step failed.
# Usage: kernels/gpu_check.sh [arguments for python -m bench_svc.benches.kernels]
# Environment: PYTHON (default: the repo's .venv/bin/python if there, else python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "== gpu_check: $*" >&2; }

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
  say "no CUDA GPU visible to $PYTHON: run this on the GPU machine"; exit 2; }
"$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
  "triton", triton.__version__, "gpu", torch.cuda.get_device_name())'

failed=()
say "building the CUDA RMSNorm extension"
PYTHON="$PYTHON" kernels/rmsnorm_cuda/build.sh || failed+=(build)
say "kernel tests on the GPU"
"$PYTHON" -m pytest kernels -q -rs -p no:cacheprovider || failed+=(tests)
say "benchmark"
"$PYTHON" -m bench_svc.benches.kernels "$@" || failed+=(bench)
if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all steps passed"
