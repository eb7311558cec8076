#!/usr/bin/env bash
# GPU checks of the fast path in under 5 minutes on the lent machine (H100/H200, torch 2.11 + CUDA 13,
# onnxruntime CPU, no network, nothing to install: random weights, iadgpt from this checkout).
#   1. the GPU tests:           pytest -m gpu -rs tests/test_cuda_graph.py
#   2. the host side:           benchmarks/host_copy.py (frame copy and BGR -> RGB conversion, quiet and busy)
#   3. the latency benchmark:   benchmarks/gpu_latency.py --device cuda --random-weights (+ parity vs onnxruntime)
# Prints the GPU; writes gpu.txt, pytest_gpu.txt, host_copy.txt, gpu_latency.json and gpu_latency.log to $OUT
# (or ./out/gpu_check).
#
#   bash benchmarks/gpu_check.sh                        # from the repository root
#   bash benchmarks/gpu_check.sh --variants graph-fused,graph-fused-compile,onnxruntime   # extra args -> gpu_latency.py
# Where the time goes (stages, kernels, attention backends): benchmarks/gpu_profile.py (not run by this script).
# Environment: GPU_CHECK_BUDGET_S (default 280: whole script), PYTHON (default python3), GPU_CHECK_DECODER=1
# (also the decoder-bundle GPU test of tests/test_train.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT_DIR="${OUT:-$PWD/out/gpu_check}"  # out/ is git-ignored
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-280}"
START=$(date +%s)

echo "== GPU"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1 || echo "nvidia-smi not available"
  "$PY" -c "import torch; ok = torch.cuda.is_available(); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO CUDA GPU')"
} | tee "$OUT_DIR/gpu.txt"

echo "== GPU tests"
GPU_TESTS=(tests/test_cuda_graph.py)
# GPU_CHECK_DECODER=1 adds the decoder+bank bundle on the fast path (tests/test_train.py; ~1 min of the budget)
[ "${GPU_CHECK_DECODER:-0}" = 1 ] && GPU_TESTS+=(tests/test_train.py)
timeout $(( ${#GPU_TESTS[@]} > 1 ? 260 : 170 )) "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 \
    | tee "$OUT_DIR/pytest_gpu.txt"
RC_TESTS=${PIPESTATUS[0]}

echo "== host side: frame copy and BGR -> RGB conversion, quiet and beside 2 busy processes"
for BUSY in 0 2; do for GAP in 0 1; do
    timeout 60 "$PY" benchmarks/host_copy.py --busy $BUSY --gap-ms $GAP --calls 1000 2>&1
done; done | tee "$OUT_DIR/host_copy.txt"

LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
echo "== latency benchmark (${LEFT} s left)"
timeout $(( LEFT > 30 ? LEFT : 30 )) "$PY" benchmarks/gpu_latency.py --device cuda --random-weights \
    --budget-s $(( LEFT > 60 ? LEFT - 45 : 15 )) --json "$OUT_DIR/gpu_latency.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_latency.log"
RC_BENCH=${PIPESTATUS[0]}

echo "== done in $(( $(date +%s) - START )) s: tests rc=$RC_TESTS, benchmark rc=$RC_BENCH; results in $OUT_DIR"
[ "$RC_TESTS" -eq 0 ] && [ "$RC_BENCH" -eq 0 ]
