#!/usr/bin/env bash
# Set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python -m pytest tests -q "$@"
# The CUDA kernels are compiled and linked against the CUDA build of torch on every run (no GPU
# needed); TORCH_MHA_SKIP_CUDA_BUILD=1 skips that for a quick local run.
if [ "${TORCH_MHA_SKIP_CUDA_BUILD:-0}" != "1" ]; then
  bash scripts/check_cuda_build.sh
fi
