#!/usr/bin/env bash
# One device call: versions, the GPU test files, then the step benchmark. Writes logs under $OUT
# (or ./gpu-out). Usage: bash benchmarks/gpu_check.sh [tests|bench|all] [step_time.py args...]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
what=${1:-all}; shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
if [[ $what == tests || $what == all ]]; then
  timeout 120 python3 -m pytest -q tests/test_kernels.py tests/test_packed.py tests/test_block_mask_kernel.py 2>&1 | tail -4 | tee "$OUT/kernel_tests.log"
fi
if [[ $what == bench || $what == all ]]; then
  timeout 330 python3 benchmarks/step_time.py "$@" --json "$OUT/step_time.json" 2>&1 | tee "$OUT/step_time.log" | grep -v "^W1\|warn" | tail -60
fi
if [[ $what == tests || $what == all ]]; then
  timeout 150 python3 -m pytest -q -x tests/test_gpu_step.py 2>&1 | tail -25 | tee "$OUT/gpu_step_tests.log"
  timeout 120 python3 -m pytest -q tests/test_swin.py tests/test_step.py 2>&1 | tail -15 | tee "$OUT/swin_step_tests.log"
fi
