#!/usr/bin/env bash
# Build the CUDA RMSNorm pybind11 extension for the Python that will import it, with the flags of the Bazel genrule
# (kernels/BUILD, :rmsnorm_cuda_ext). An extension is tied to its Python version, so the GPU machine (Python 3.12)
# builds its own: `kernels/rmsnorm_cuda/build.sh` writes rmsnorm_cuda_ext<EXT_SUFFIX> beside the loader.
# Usage: build.sh [OUTPUT.so]     Environment: PYTHON (default: python3), NVCC (default: nvcc on PATH, else
# /usr/local/cuda/bin/nvcc, else /usr/local/bin/nvcc).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
if [ -z "${NVCC:-}" ]; then
  NVCC="$(command -v nvcc || true)"
  for candidate in /usr/local/cuda/bin/nvcc /usr/local/bin/nvcc; do
    [ -n "$NVCC" ] || { [ -x "$candidate" ] && NVCC="$candidate"; } || true
  done
fi
[ -n "$NVCC" ] || { echo "build.sh: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; }
OUT="${1:-$HERE/rmsnorm_cuda_ext$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')}"
# shellcheck disable=SC2046  # the include flags are meant to split
"$NVCC" -O3 -std=c++17 -shared -Xcompiler -fPIC $("$PY" -m pybind11 --includes) \
  -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 -cudart=static \
  "$HERE/rmsnorm_cuda.cu" -o "$OUT"
echo "$OUT"
