#!/usr/bin/env bash
# The CUDA check of issue 19, in ONE device call that ends inside 9 minutes:
#   1. build  build and install moe_ext with nvcc for the device's arch only (sm_90);
#   2. info   moe-ext info, nvidia-smi, nvcc and torch versions;
#   3. first  a small group of GPU tests (one per kernel) with CUDA_LAUNCH_BLOCKING=1, so a fault names its kernel;
#   4. tests  every test of tests/cuda with MOE_EXT_REQUIRE_GPU=1 (a skip for want of a GPU is a failure);
#   5. memcheck  compute-sanitizer --tool memcheck over a few GPU tests, PYTORCH_NO_CUDA_MEMORY_CACHING=1
#             (a runtime that refuses the sanitizer is recorded as REFUSED, not a failure);
#   6. bench  bench/gpu.py: the fair benchmark, JSON in $OUT/gpu-bench.json.
# Each step has its own timeout (capped so that the whole run stays within BUDGET_S = 530 s), writes
# $OUT/<step>.log, and a failing step does not stop the later ones. $OUT/summary.txt comes last (and is printed).
# Exactly 8 files land in $OUT (the device tool returns at most 8). STEPS="build tests" (say) runs only those
# steps, for a rerun after a fix; TESTS_K="expr" narrows the tests step to a pytest -k expression.
#
# On the GPU machine (device tool `run`, from the repository root):  bash bench/device_check.sh   (timeout_s=600)
# Dry run on a machine without a GPU (no install: the in-place build under python/ is used; the GPU steps
# then fail fast, and must, for want of a device; the benchmark runs with --dry-run):
#   OUT=/tmp/dc DRY_RUN=1 PYTHON=.venv/bin/python bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-check-out}
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-530}
STEPS=" ${STEPS:-build info first tests memcheck bench} "
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
STARTED=$(date +%s)
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if [ "$DRY_RUN" = 1 ]; then export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}; fi
echo "device_check $(date -u +%FT%TZ) dry_run=$DRY_RUN commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')" > "$SUMMARY"

# A few GPU tests, one per kernel (route, permute, decode and tiled grouped GEMM, fused layer, dW, unpermute),
# then the activation descriptions and expert biases (test_cuda_activations.py): gpt-oss's interleaved,
# clamped gate with biases through the decode and tiled epilogues, the standalone activation and its
# backward, bias_grad, the fused layer and its gradients.
FIRST='(test_grouped_gemm and bfloat16 and swiglu and (decode-k61 or tiled-E300)) or (test_route_matches and bfloat16 and deepseek and 37) or (test_permute_matches and 300-2-4-20) or (test_experts_and_moe and bfloat16 and swiglu and odd) or (test_grouped_gemm_backward and bfloat16 and dW-cp) or (test_unpermute_and_permute_backward and bfloat16 and 41)'
FIRST+=' or (test_grouped_gemm_epilogue and [bias-gpt_oss and (decode_odd or tiled_odd) and bfloat16) or (test_experts_with_biases and [odd-gpt_oss-bfloat16]) or (test_activate_and_backward and [53-37-gpt_oss-bfloat16]) or (test_bias_grad and 300-90-8-bfloat16) or (test_experts_gradients and [odd-gpt_oss-float32])'
MEMCHECK='(test_grouped_gemm and bfloat16 and swiglu and decode-k61) or (test_permute_matches and 300-2-4-20) or (test_experts_and_moe and bfloat16 and swiglu and odd) or (test_grouped_gemm_backward and bfloat16 and dW-cp) or (test_grouped_gemm_epilogue and [bias-gpt_oss and (decode_odd or tiled_odd) and bfloat16) or (test_bias_grad and 300-90-8-bfloat16)'
PYTEST=(-m pytest -q -p no:cacheprovider -rfE)

# step NAME LIMIT_S RESERVE_S COMMAND...: runs COMMAND with timeout min(LIMIT_S, what the budget leaves after
# RESERVE_S for the later steps); log in $OUT/NAME.log; one line in the summary. Never stops the script.
step() {
  local name=$1 limit=$2 reserve=$3 t0 left rc status
  shift 3
  case "$STEPS" in *" $name "*) ;; *) printf '%-9s %-8s\n' "$name" "not run (STEPS)" >> "$SUMMARY"; return 0 ;; esac
  t0=$(date +%s)
  left=$(( BUDGET_S - (t0 - STARTED) - reserve ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%-9s %-8s %s\n' "$name" SKIPPED "no time left in the ${BUDGET_S}s budget" >> "$SUMMARY"
    return 0
  fi
  echo "== $name (timeout ${limit}s): $*" > "$OUT/$name.log"
  timeout --kill-after=5 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=TIMEOUT ;; *) status=FAIL ;; esac
  if [ "$name" = memcheck ] && [ "$status" != ok ] && ! grep -qE "ERROR SUMMARY: [1-9]|Invalid (__global__|__shared__)" "$OUT/$name.log" \
     && grep -qE "Device not supported|CUDA_ERROR_NOT_SUPPORTED|error 999|not found on PATH" "$OUT/$name.log"; then
    status=REFUSED  # the sanitizer could not run on this runtime (gVisor, say): recorded, not a failure
  fi
  printf '%-9s %-8s rc=%-3s %4ss\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
  echo "[$name] $status (rc $rc, $(( $(date +%s) - t0 ))s)"
}

# ---- 1. build and install (sm_90 only; --no-build-isolation: the machine's torch, pybind11, scikit-build-core)
if [ "$DRY_RUN" = 1 ]; then
  step build 60 470 "$PY" -c "import moe_ext, moe_ext._cuda; print('in-place build', moe_ext.__file__, moe_ext._cuda.build_info())"
else
  step build 210 300 "$PY" -m pip install --no-build-isolation --no-deps -v . \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Ccmake.define.MOE_EXT_CUDA=ON -Cbuild-dir=/tmp/moe-ext-build
fi

# ---- 2. what is installed and what it sees
export PY
step info 30 280 bash -c '
  "$PY" -m moe_ext info; rc=$?
  "$PY" -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2; command -v compute-sanitizer
  exit $rc'

# ---- 3. a small group first, every launch synchronous: a fault names its kernel
CUDA_LAUNCH_BLOCKING=1 MOE_EXT_REQUIRE_GPU=1 step first 60 240 "$PY" "${PYTEST[@]}" --maxfail=3 \
  tests/cuda/test_cuda_gpu.py tests/cuda/test_cuda_activations.py -k "$FIRST"

# ---- 4. every CUDA test; a missing GPU or module is a failure here, never a skip
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
MOE_EXT_REQUIRE_GPU=1 step tests 180 150 "$PY" "${PYTEST[@]}" "${XDIST[@]}" tests/cuda ${TESTS_K:+-k "$TESTS_K"}

# ---- 5. memcheck over a few tests (no caching allocator, so a stray access is not hidden inside a pool)
if command -v compute-sanitizer > /dev/null; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 MOE_EXT_REQUIRE_GPU=1 step memcheck 60 120 compute-sanitizer --tool memcheck \
    --error-exitcode 3 --target-processes all "$PY" "${PYTEST[@]}" tests/cuda/test_cuda_gpu.py \
    tests/cuda/test_cuda_activations.py -k "$MEMCHECK"
else
  step memcheck 10 120 sh -c "echo 'compute-sanitizer: not found on PATH'; exit 127"
fi

# ---- 6. the benchmark (a wrong moe_ext result fails it)
if [ "$DRY_RUN" = 1 ]; then
  step bench 120 0 "$PY" bench/gpu.py --dry-run --only mixtral --iters 1 --json "$OUT/gpu-bench.json"
else
  step bench 200 0 "$PY" bench/gpu.py --json "$OUT/gpu-bench.json"
fi

# ---- summary: the steps, the test counts, memcheck's verdict, the benchmark's moe_ext rows
{
  echo "total $(( $(date +%s) - STARTED ))s of a ${BUDGET_S}s budget"
  for name in first tests memcheck; do
    [ -f "$OUT/$name.log" ] && echo "$name: $( (grep -E '[0-9]+ (passed|failed|error|errors|skipped)' "$OUT/$name.log" || tail -1 "$OUT/$name.log") | tail -1)"
  done
  grep -E "ERROR SUMMARY|Device not supported" "$OUT/memcheck.log" 2>/dev/null | tail -2
  grep -E "^(FAILED|ERROR) " "$OUT/first.log" "$OUT/tests.log" 2>/dev/null | head -20
  if [ -f "$OUT/bench.log" ]; then
    grep -E "^device:" "$OUT/bench.log" | head -1
    if grep -qE "^case +impl" "$OUT/bench.log"; then  # the final table; else (stopped early) the cases done
      awk '/^case +impl/{table=1} table' "$OUT/bench.log" | grep -E "^case|moe_ext |grouped_mm|FAIL" | head -60
    else
      grep -E "moe_ext |grouped_mm" "$OUT/bench.log" | head -60
    fi
    grep -E "^FAIL|peer failed" "$OUT/bench.log" | head -10
  fi
} >> "$SUMMARY"
cat "$SUMMARY"
