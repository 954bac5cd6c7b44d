#!/usr/bin/env bash
# Every GPU measurement of the project in one command, for a lent GPU machine whose copy of the tree has no .git,
# no venv and no network: `tools/gpu_session.sh STEP[:SECONDS] ...`, each step under its own time limit, a failed
# or timed-out step reported and the rest still run. Prepare here first with `tools/gpu_session.sh --bundle`: it
# fills .gpu/ (git-ignored) with the commit being measured, the corpus ($TINYLM_CORPUS) and the generated protos;
# wheels the machine lacks go in .whl/ (README "GPU runs"). On the machine, results land in bench_svc/results/ as
# usual; with $OUT set (the device tool's output folder) the new result files are packed into $OUT/results.tgz and
# the whole log is $OUT/session.log.
#
# Steps: tests (CUDA build + every GPU test under kernels/, model/, inference_svc/; $GPU_TESTS narrows them), kernels (python -m bench_svc.benches.kernels),
#        speculative, speculative-engine (bench_svc.benches.speculative_engine; $SPEC_K, $SPEC_ARGS), train (bench_svc.benches.training --part speed), serve (bench_svc.benches.inference_serving
#        --device cuda), compile (bench_svc.benches.train_compile), checkpointing (bench_svc.benches.train_checkpointing),
#        train-profile / train-carryover / muon-probe (tools.train_probe: step time split, state left between runs,
#        the eager Muon loop against the captured step one difference at a time),
#        draft-probe (tools.draft_probe; compute-sanitizer on a failure),
#        startup-probe (tools.startup_probe: a new process's imports, each timed), serve-probe (tools.serve_probe: decode step wall vs GPU-busy, kernels per step; $PROBE_ARGS), serve-probe-plain
#        (the same without the small-batch decode kernels), grpc-probe (tools.grpc_probe: the gRPC server's ceiling over
#        an instant runner, aio and threads; CPU only; $GRPC_PROBE_ARGS), decode-step (kernels.decode_step_bench; $DECODE_BATCHES).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUNDLE="$ROOT/.gpu"

if [ "${1:-}" = "--bundle" ]; then
  [ -n "${TINYLM_CORPUS:-}" ] && [ -f "$TINYLM_CORPUS" ] || { echo "--bundle: set TINYLM_CORPUS to the corpus file" >&2; exit 2; }
  [ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "--bundle: commit first; the figures must name a commit" >&2; exit 2; }
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/protos"
  git rev-parse HEAD >"$BUNDLE/COMMIT"
  cp "$TINYLM_CORPUS" "$BUNDLE/corpus.txt"
  cp protos/*_pb2*.py "$BUNDLE/protos/"
  echo "bundled commit $(cat "$BUNDLE/COMMIT") in $BUNDLE ($(du -sh "$BUNDLE" | cut -f1))"
  exit 0
fi

OUT="${OUT:-}"
LOG="${OUT:+$OUT/session.log}"
LOG="${LOG:-/dev/null}"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tinylm-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/tinylm-site"
fi
if [ -d "$BUNDLE" ]; then
  export TINYLM_GIT_COMMIT="$(cat "$BUNDLE/COMMIT")" TINYLM_CORPUS="${TINYLM_CORPUS:-$BUNDLE/corpus.txt}"
  cp -n "$BUNDLE"/protos/*.py protos/ 2>/dev/null || true
fi
export TINYLM_HOME="${TINYLM_HOME:-/tmp/tinylm-home}"
"$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton",
  triton.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader || true

marker="$(mktemp)"
declare -a summary=()
run_step() {  # run_step NAME SECONDS CMD...
  local name="$1" limit="$2"; shift 2
  echo "== step $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  summary+=("$(printf '%-14s rc=%-4s %5d s' "$name" "$rc" $((SECONDS - t0)))")
  pack  # after every step: a call cut short still brings back what its finished steps wrote
  return $rc
}
pack() {
  [ -n "$OUT" ] || return 0
  find bench_svc/results -type f -newer "$marker" -print0 | tar czf "$OUT/results.tgz" --null -T - 2>/dev/null || true
}

built=0
build_ext() { [ "$built" = 1 ] || run_step build 120 env PYTHON="$PYTHON" kernels/rmsnorm_cuda/build.sh; built=1; }

for spec in "$@"; do
  step="${spec%%:*}"; limit="${spec#*:}"; [ "$limit" = "$spec" ] && limit=300
  case "$step" in
    tests)  # every GPU test, 8 processes (Triton compiles on the CPU); failures listed with short tracebacks; each
      # test's outcome printed as it finishes (-v), so a step its limit cuts short still names its failures
      # (TEST_QUIET=-q: dots only)
      build_ext
      run_step gpu-tests "$limit" "$PYTHON" -m pytest ${TEST_QUIET:--v} -rfEs --tb=short -p no:cacheprovider -n 8 --timeout="${TEST_TIMEOUT:-120}" \
        ${GPU_TESTS:-kernels model/kernel_routing_test.py model/fused_block_test.py inference_svc/runner_test.py inference_svc/resident_test.py} ;;
    kernels)  # the fused-FFN rows are taken first, alone; SECONDS bounds the whole benchmark
      build_ext
      if [ -n "${KERNELS_ONLY:-}" ]; then  # a subset: kernels-<gpu>-<words>.*
        run_step kernel-bench "$limit" "$PYTHON" -m bench_svc.benches.kernels --only "$KERNELS_ONLY"
      else
        run_step ffn-bench 120 "$PYTHON" -m bench_svc.benches.kernels --only fused_ffn
        run_step kernel-bench "$limit" "$PYTHON" -m bench_svc.benches.kernels
      fi ;;
    speculative)
      run_step speculative "$limit" "$PYTHON" -m bench_svc.benches.speculative --device cuda --target-steps 1500 \
        --draft-steps 600 --batch 32 --target-train-s 60 --draft-train-s 30 --prompts 2 --max-new-tokens 96 --repeats 2 ;;
    speculative-engine)  # the engine with a draft (speculative rounds on the device) vs without, B=1 and 16, k 1-4;
      # $SPEC_ARGS: more options (SPEC_ARGS="--rounds loop,draft,draft+verify+accept": round designs side by side)
      run_step speculative-engine "$limit" "$PYTHON" -m bench_svc.benches.speculative_engine --device cuda \
        --target-steps 1500 --draft-steps 600 --batch 32 --target-train-s 45 --draft-train-s 20 --concurrency 1,16 \
        --k "${SPEC_K:-1,2,3,4}" --max-new-tokens 90 --repeats 5 ${SPEC_ARGS:-} ;;
    train) run_step train "$limit" "$PYTHON" -m bench_svc.benches.training --part speed --budget-s "${TRAIN_BUDGET_S:-120}" ${TRAIN_TAG:+--tag "$TRAIN_TAG"} \
      ${TRAIN_VARIANTS:+--variants "$TRAIN_VARIANTS"} ;;
    train-profile) run_step train-profile "$limit" "$PYTHON" -m tools.train_probe profile ${PROBE_VARIANTS:+--variants "$PROBE_VARIANTS"} ;;
    train-carryover) run_step train-carryover "$limit" "$PYTHON" -m tools.train_probe carryover --steps "${PROBE_STEPS:-300}" --eval-interval 100 ;;
    muon-probe) run_step muon-probe "$limit" "$PYTHON" -m tools.train_probe muon-eager ${PROBE_ARGS:-} ;;  # the eager Muon loop, one difference from the captured step at a time
    pytest) run_step pytest "$limit" "$PYTHON" -m pytest -q -rfEs --tb=short -p no:cacheprovider ${GPU_TESTS:?set GPU_TESTS} ;;
    train-tests) run_step train-tests "$limit" "$PYTHON" -m pytest -q -rfEs --tb=short -p no:cacheprovider trainer/train_gpu_test.py ;;
    train-all) run_step train-all "$limit" "$PYTHON" -m bench_svc.benches.training --part all --budget-s "${TRAIN_BUDGET_S:-60}" \
      ${TRAIN_VARIANTS:+--variants "$TRAIN_VARIANTS"} ${TRAIN_TAG:+--tag "$TRAIN_TAG"} ${TRAIN_STARTUP:+--startup "$TRAIN_STARTUP"} ;;
    train-startup) run_step train-startup "$limit" "$PYTHON" -m bench_svc.benches.training --part startup ${TRAIN_STARTUP:+--startup "$TRAIN_STARTUP"} ${TRAIN_TAG:+--tag "$TRAIN_TAG"} ;;
    startup-probe) run_step startup-probe "$limit" "$PYTHON" -m tools.startup_probe ;;  # import by import, fresh processes
    train-sdpa) run_step train-sdpa "$limit" "$PYTHON" -m tools.train_probe sdpa --steps "${PROBE_STEPS:-300}" --eval-interval 100 ;;
    serve) run_step serve "$limit" "$PYTHON" -m bench_svc.benches.inference_serving --device cuda ${SERVE_ARGS:-} ;;
    serve-probe) run_step serve-probe "$limit" "$PYTHON" -m tools.serve_probe ${PROBE_ARGS:-} ;;
    grpc-probe) run_step grpc-probe "$limit" "$PYTHON" -m tools.grpc_probe --server aio,threads ${GRPC_PROBE_ARGS:-} ;;
    serve-probe-plain) run_step serve-probe-plain "$limit" "$PYTHON" -m tools.serve_probe --no-small-batch-kernels ${PROBE_ARGS:-} ;;
    sampling) run_step sampling "$limit" "$PYTHON" -m kernels.sampling_bench ;;  # the one-launch sampler vs torch
    draft-probe)  # tools.draft_probe: the one-launch draft kernel as the engine calls it; on a failure, again under
      # compute-sanitizer's memcheck (the faulting kernel, thread and address)
      run_step draft-probe "$limit" env CUDA_LAUNCH_BLOCKING=1 "$PYTHON" -m tools.draft_probe ${PROBE_ARGS:-} \
        || run_step draft-memcheck "$limit" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
          --print-limit 4 "$PYTHON" -m tools.draft_probe --k 2 ;;  # no caching allocator: every tensor its own
          # allocation, so memcheck sees a write past a tensor (inside the allocator's blocks it cannot)
    decode-step)  # the small-batch decode kernels against the default step, each captured (kernels.decode_step_bench)
      run_step decode-step "$limit" "$PYTHON" -m kernels.decode_step_bench --batches "${DECODE_BATCHES:-1,8}" ;;
    compile) run_step compile "$limit" "$PYTHON" -m bench_svc.benches.train_compile --device cuda --timeout-s 120 ;;
    checkpointing) run_step checkpointing "$limit" "$PYTHON" -m bench_svc.benches.train_checkpointing --device cuda ;;
    *) echo "unknown step '$step' (tests, kernels, speculative, speculative-engine, train, serve, compile, checkpointing)"; summary+=("$step unknown") ;;
  esac
done

if [ -n "$OUT" ]; then
  gzip -f "$OUT"/*.json 2>/dev/null || true
  pack
  tar tzf "$OUT/results.tgz"
fi
echo "== summary"
printf '%s\n' "${summary[@]}"
