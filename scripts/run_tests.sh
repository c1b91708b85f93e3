#!/usr/bin/env bash
# Set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
# The CUDA kernels are compiled and linked against the CUDA build of torch on every run (no GPU
# needed); TORCH_MHA_SKIP_CUDA_BUILD=1 skips that for a quick local run. It runs beside pytest:
# nvcc spends most of its time on one translation unit and pytest on one core, so on a 2-core
# machine the two together take little more than the longer one.
cuda_check_pid=""
cuda_check_log=build/cuda-check.log
if [ "${TORCH_MHA_SKIP_CUDA_BUILD:-0}" != "1" ]; then
  mkdir -p build
  bash scripts/check_cuda_build.sh >"$cuda_check_log" 2>&1 &
  cuda_check_pid=$!
fi
status=0
python -m pytest tests -q "$@" || status=$?
if [ -n "$cuda_check_pid" ]; then
  cuda_status=0
  wait "$cuda_check_pid" || cuda_status=$?
  cat "$cuda_check_log"
  if [ "$cuda_status" != 0 ]; then
    echo "run_tests: the CUDA build check failed (status $cuda_status)" >&2
    [ "$status" != 0 ] || status=$cuda_status
  fi
fi
exit "$status"
