#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA, run the `cuda` tests, benchmark the loss and
# descriptor matching.
# Usage (repository root): OUT=/some/dir bash bench/gpu_session.sh [pytest args...]
# Env: SSLD_SKIP_TESTS=1, SSLD_SKIP_BENCH=1 (no benchmark), SSLD_SKIP_DIVERGENCE=1,
#      SSLD_SKIP_MATCH=1, SSLD_SKIP_SELECT=1, SSLD_SKIP_TRAIN=1 (these two need timm),
#      SSLD_TUNE=1 (measure backends and launch configs first: python -m ssld_kernels.tune;
#      the benchmark then runs with that table), SSLD_BENCH_ARGS="--dtypes bfloat16" (divergence),
#      SSLD_MATCH_ARGS="--sizes 1000000x1000000 --pairs 4096" (bench_match.py),
#      SSLD_SKIP_LOADER=1 (bench_loader.py: the DataLoader, plus DALI if installed there),
#      SSLD_GIT_SHA (recorded in the JSON when the tree has no .git, as on a device copy)
# Liger-Kernel wheels, if wanted, go in .whl/ (see bench/README.md).
set -uo pipefail
OUT=${OUT:-/tmp/ssld-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.txt" 2>&1
export SSLD_CUDA=1 SSLD_CUDA_ARCHS=${SSLD_CUDA_ARCHS:-90}
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m ssld_kernels | tee "$OUT/backends.txt"
if [ "${SSLD_SKIP_TESTS:-0}" != "1" ]; then
  python3 -m pytest -q -m cuda tests "$@" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
fi
if [ "${SSLD_TUNE:-0}" = "1" ]; then  # first, so that the benchmark's "auto" uses the table
  SSLD_KERNELS_TUNE_FILE="$OUT/tune.json" python3 -m ssld_kernels.tune 2>&1 | tee "$OUT/tune.log" | tail -30
  export SSLD_KERNELS_TUNE_FILE="$OUT/tune.json"
fi
if [ "${SSLD_SKIP_BENCH:-0}" != "1" ] && [ "${SSLD_SKIP_DIVERGENCE:-0}" != "1" ]; then
  python3 bench/bench_divergence.py --out "$OUT/divergence.json" --plot ${SSLD_BENCH_ARGS:-} \
    --providers "${SSLD_BENCH_PROVIDERS:-ssld-auto,ssld-cuda,ssld-triton,eager,compile,liger}" 2>&1 \
    | tee "$OUT/bench.log" | tail -60
fi
if [ "${SSLD_SKIP_BENCH:-0}" != "1" ] && [ "${SSLD_SKIP_MATCH:-0}" != "1" ]; then
  # defaults on a GPU: knn 100000x100000 and 1000000x1000000 (k=2), 4096 pairs of 512x512
  python3 bench/bench_match.py --out "$OUT/match.json" --plot ${SSLD_MATCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_match.log" | tail -80
fi
if [ "${SSLD_SKIP_BENCH:-0}" != "1" ] && [ "${SSLD_SKIP_SELECT:-0}" != "1" ]; then
  python3 bench/bench_select.py --out "$OUT/select.json" 2>&1 | tee "$OUT/bench_select.log" | tail -10
fi
if [ "${SSLD_SKIP_BENCH:-0}" != "1" ] && [ "${SSLD_SKIP_TRAIN:-0}" != "1" ]; then
  python3 bench/bench_train.py --out "$OUT/train.json" 2>&1 | tee "$OUT/bench_train.log" | tail -10
fi
if [ "${SSLD_SKIP_BENCH:-0}" != "1" ] && [ "${SSLD_SKIP_LOADER:-0}" != "1" ]; then
  python3 bench/bench_loader.py --images 8192 --workers 16 --batch-size 256 \
    --out "$OUT/loader.json" 2>&1 | tee "$OUT/bench_loader.log" | tail -6
fi
