#!/usr/bin/env bash
# The prepared GPU check (issue 14): one device call, at most SSLD_CHECK_SECONDS (480) of wall
# time on an H200, stages in priority order, each cut at its own budget and at the deadline.
#
# Off-device, once per commit (saves the build stage on the device; needs python3.12 + nvcc):
#   bash bench/gpu_check.sh --prepare     # .devbuild/: the cp312 sm_90 extension + the sha
#                                         # .whl/: the Liger-Kernel wheel (when pip reaches it)
#   echo /.devbuild/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
# On the device (the run tool, carry [".devbuild", ".whl"], timeout_s 540):
#   bash bench/gpu_check.sh               # writes everything under $OUT
# Rerun one part only: SSLD_STAGES="tests" (any of build,tests,sanitizer,tune,divergence,
# match,train,fused_linear; tune is not in the default list), SSLD_PYTEST_ARGS="tests/test_match_cuda.py"
# narrows the test stage, SSLD_PYTEST_WORKERS (12) sets its xdist workers.
#
# Stages and budgets (seconds; a stage never runs past the overall deadline):
#   build       prebuilt .devbuild extension if it imports there, else an sm_90 build (150)
#   tests       pytest -m cuda, xdist, per-test timeout; log starts with sha/GPU/versions (210)
#   sanitizer   compute-sanitizer memcheck (divergence, match, sparse) + racecheck (match) (75)
#   tune        (opt-in) python -m ssld_kernels.tune into $OUT/tune.json, used by the rest (240)
#   divergence  bench_divergence at 256x1000, 8192x32000, 4096x128256, fp32 + bf16 (120)
#   match       bench_match 200k x 200k and 4096 pairs of 512x512 vs torch cdist fp16/fp32 (60)
#   train       bench_train resnet50 <- resnet101, batch 256 vs the naive loop (60)
#   fused_linear  bench_fused_linear 8192 x 4096 x 128256 bf16 vs eager, chunked, Liger (60)
# Every stage writes its log and JSON under $OUT; summary.txt lists each stage's status; on exit
# the other logs are packed into logs.tar.gz (the device returns at most 8 files).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  py=${SSLD_PREP_PYTHON:-python3.12}
  if ! "$py" -c pass 2>/dev/null; then  # pyenv's shim without a global 3.12
    py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
  fi
  [ -n "$py" ] || { echo "--prepare needs python3.12 (the device's python); set SSLD_PREP_PYTHON" >&2; exit 1; }
  rm -rf .devbuild && mkdir -p .devbuild .whl
  git rev-parse HEAD > .devbuild/GIT_SHA
  [ -z "$(git status --porcelain --untracked-files=no)" ] || echo "warning: uncommitted changes" >&2
  "$py" -m pip install -q --user pybind11 cmake ninja "setuptools>=77" wheel
  tmp=$(mktemp -d)
  git archive HEAD | tar -x -C "$tmp"
  (cd "$tmp" && SSLD_CUDA=1 SSLD_CUDA_ARCHS=90 "$py" setup.py -q build_ext --inplace)
  cp "$tmp"/ssld_kernels/_C.cpython-312-*.so .devbuild/
  rm -rf "$tmp"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform any -d .whl \
    "liger-kernel==${LIGER_VERSION:-0.8.5}" || echo "no Liger wheel: its providers are skipped" >&2
  du -sh .devbuild .whl
  exit 0
fi

OUT=${OUT:-/tmp/ssld-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$(( START + ${SSLD_CHECK_SECONDS:-480} ))
STAGES=${SSLD_STAGES:-build,tests,sanitizer,divergence,match,train,fused_linear}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# The device returns at most 8 files from $OUT: on exit (also when cut), everything but the
# summary, the pytest log and the benchmark JSONs goes into logs.tar.gz.
bundle() {
  (cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.txt ! -name pytest_cuda.log \
    ! -name '*.json' ! -name logs.tar.gz ! -name .bundle -printf '%P\n' > .bundle \
    && [ -s .bundle ] && tar -czf logs.tar.gz -T .bundle && xargs rm -f < .bundle; rm -f .bundle)
}
trap bundle EXIT
want() { [[ ",$STAGES," == *",$1,"* ]]; }
left() { echo $(( DEADLINE - $(date +%s) )); }
budget() {  # min(stage budget, time to the deadline)
  local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"
}
record() { echo "$1: $2 ($(( $(date +%s) - START )) s elapsed)" | tee -a "$SUMMARY"; }
run_stage() {  # name budget log cmd...: the command under a timeout, status recorded
  local name=$1 b; b=$(budget "$2"); local log=$3; shift 3
  if [ "$b" -lt 10 ]; then record "$name" "skipped: no time left"; return 1; fi
  local t0; t0=$(date +%s)
  timeout -s INT -k 30 "$b" "$@" > "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record "$name" "cut at its budget ${b} s"
  else record "$name" "rc $rc in ${dt} s"; fi
  return "$rc"
}

# ------------------------------------------------------------------ versions (log headers)
SHA=${SSLD_GIT_SHA:-$(cat .devbuild/GIT_SHA 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)}
export SSLD_GIT_SHA=$SHA
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  echo "commit $SHA"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -1
  compute-sanitizer --version 2>/dev/null | head -1
} > "$OUT/header.txt" 2>&1
cat "$OUT/header.txt"

# ------------------------------------------------------------------------------- build
# No pip: the extension goes in place and the tree is put on PYTHONPATH (the image's setuptools
# and pip may not satisfy pyproject's build requirements, and nothing can be fetched there).
export SSLD_CUDA=1 SSLD_CUDA_ARCHS=${SSLD_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=16
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if want build; then
  t0=$(date +%s)
  so=$(ls .devbuild/_C.cpython-312-*.so 2>/dev/null | head -1)
  if [ -n "$so" ] && cp "$so" ssld_kernels/ && python3 -c "import ssld_kernels._C" 2>"$OUT/prebuilt.err"; then
    record build "prebuilt extension from .devbuild imports ($(basename "$so"))"
  else
    rm -f ssld_kernels/_C.cpython-312-*.so
    run_stage build 150 "$OUT/build.log" python3 setup.py -q build_ext --inplace \
      || { tail -40 "$OUT/build.log"; record build "FAILED: nothing else can run"; exit 1; }
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
fi
python3 -m ssld_kernels > "$OUT/backends.txt" 2>&1; cat "$OUT/backends.txt"

# ------------------------------------------------------------------------------- tests
if want tests; then
  log="$OUT/pytest_cuda.log"
  cp "$OUT/header.txt" "$log"
  # shellcheck disable=SC2086
  run_stage tests 210 "$OUT/pytest_cuda.raw" python3 -m pytest -m cuda -q -n "${SSLD_PYTEST_WORKERS:-12}" \
    --timeout 90 --timeout-method=thread -p no:cacheprovider -rfE --durations=15 \
    --junitxml="$OUT/pytest_cuda.xml" ${SSLD_PYTEST_ARGS:-tests}
  cat "$OUT/pytest_cuda.raw" >> "$log"; rm -f "$OUT/pytest_cuda.raw"
  tail -25 "$log"
fi

# --------------------------------------------------------------------------- sanitizer
if want sanitizer; then
  if ! timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
      python3 -c "import torch; torch.ones(4, device='cuda').sum().item()" \
      > "$OUT/sanitizer_probe.log" 2>&1; then
    record sanitizer "not supported on this runtime: $(grep -m1 -iE 'error|not supported' \
      "$OUT/sanitizer_probe.log" | cut -c1-160)"
  else
    SAN="compute-sanitizer --error-exitcode 3 --print-limit 20 --target-processes all"
    san_tests=(
      "tests/test_divergence.py -k cuda-cuda and (1000 or 10-) and float32 and jsd-0.5"
      "tests/test_match_cuda.py -k ragged_groups or unaligned_views or ties"
      "tests/test_divergence_launch_configs_cuda.py -k 1001"
    )
    i=0
    for spec in "${san_tests[@]}"; do
      i=$((i + 1)); file=${spec%% -k *}; expr=${spec#* -k }
      run_stage "memcheck-$i" 25 "$OUT/memcheck_$i.log" $SAN --tool memcheck \
        python3 -m pytest -q -x -p no:cacheprovider -m cuda "$file" -k "$expr"
      grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_$i.log" | tail -2
    done
    run_stage racecheck 20 "$OUT/racecheck.log" $SAN --tool racecheck \
      python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/test_match_cuda.py -k "ragged_groups and uint8"
    grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -2
  fi
fi

# -------------------------------------------------------------------------- benchmarks
if want tune; then  # first, so that the benchmark's "auto" follows the table
  SSLD_KERNELS_TUNE_FILE="$OUT/tune.json" run_stage tune 240 "$OUT/tune.log" \
    python3 -m ssld_kernels.tune
  [ -f "$OUT/tune.json" ] && export SSLD_KERNELS_TUNE_FILE="$OUT/tune.json"
fi
if want divergence; then
  run_stage divergence 120 "$OUT/bench_divergence.log" python3 bench/bench_divergence.py \
    --shapes 256x1000,8192x32000,4096x128256 --dtypes bfloat16,float32 --modes fwdbwd,fused \
    --providers ssld-auto,ssld-cuda,ssld-triton,eager,liger,compile \
    --out "$OUT/divergence-H200.json"
  tail -30 "$OUT/bench_divergence.log"
fi
if want match; then
  run_stage match 60 "$OUT/bench_match.log" python3 bench/bench_match.py \
    --sizes 200000x200000 --k 2 --pairs 4096 --pair-size 512x512 --max-seconds 15 \
    --providers ssld-cuda,ssld-triton,torch-cdist-topk,torch-cdist-topk-fp16 \
    --out "$OUT/match-H200.json"
  tail -25 "$OUT/bench_match.log"
fi
if want train; then
  run_stage train 60 "$OUT/bench_train.log" python3 bench/bench_train.py \
    --pairs resnet50:resnet101 --batch-size 256 --steps 15 --out "$OUT/train-H200.json"
  tail -15 "$OUT/bench_train.log"
fi
if want fused_linear; then
  run_stage fused_linear 60 "$OUT/bench_fused_linear.log" python3 bench/bench_fused_linear.py \
    --device cuda --out "$OUT/fused_linear-H200.json"
  tail -12 "$OUT/bench_fused_linear.log"
fi
echo "== summary ($(( $(date +%s) - START )) s)"; cat "$SUMMARY"
