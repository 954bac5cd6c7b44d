#!/usr/bin/env bash
# Idempotent set-up: apt packages, the pinned .venv, generated protos. A second run checks stamps and returns in seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
say() { echo "tinylm setup: $*" >&2; }

# 1. System packages: Bazel 4 (Debian's bazel-bootstrap) and redis-server.
# Node.js and npm run the second, non-Python gRPC client of the end-to-end tests.
APT_PACKAGES=(bazel-bootstrap redis-server nodejs npm)
missing=()
command -v bazel >/dev/null 2>&1 || missing+=(bazel-bootstrap)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "missing system packages: ${missing[*]}"
    say "install them as root: apt-get update && apt-get install -y ${APT_PACKAGES[*]}"
    exit 1
  fi
fi

# 2. The venv, from the pinned requirements; torch first, alone, so its CPU wheel is taken.
PY="${TINYLM_PYTHON:-python3}"
want="$(cat requirements-torch.txt requirements.txt | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
stamp=.venv/.tinylm-setup
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "tinylm needs Python >= 3.11"'
  [ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
  say "installing pinned requirements into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-torch.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check; exit 1; }
  echo "$want" > "$stamp"
fi

# 3. Python code for the protos, for code run outside Bazel (Bazel generates its own copy with a genrule).
proto_sum="$(cat protos/*.proto | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.tinylm-protos 2>/dev/null)" != "$proto_sum" ] || ! ls protos/*_pb2.py >/dev/null 2>&1; then
  rm -f protos/*_pb2.py protos/*_pb2_grpc.py
  .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/*.proto
  echo "$proto_sum" > .venv/.tinylm-protos
fi

# 4. The Node gRPC client's packages, pinned by its package-lock.json.
lock_sum="$(sha256sum tests/node_client/package-lock.json | cut -c1-16)"
if [ "$(cat tests/node_client/node_modules/.tinylm-npm 2>/dev/null)" != "$lock_sum" ]; then
  say "installing the Node test client's packages (npm ci)"
  (cd tests/node_client && npm ci --no-audit --no-fund --silent)
  echo "$lock_sum" > tests/node_client/node_modules/.tinylm-npm
fi
