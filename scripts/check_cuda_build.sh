#!/usr/bin/env bash
# Compiles and links the CUDA kernels against the CUDA build of torch, without a GPU, and checks
# the result: every kernel's register / shared-memory use (ptxas -v) with no spills allowed, the
# library loads into the CUDA torch, and its CPU kernels still pass a quick test there.
#
# Environment: CUDA_TORCH_SPEC (default torch==2.14.1, the CUDA 13.0 build), CUDA_VENV (default
# .venv-cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if ! command -v nvcc >/dev/null; then
  echo "check_cuda_build: nvcc not found; install the CUDA toolkit to compile the CUDA kernels" >&2
  exit 1
fi
if [ ! -x "$CUDA_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$CUDA_VENV"
fi
CUDA_PYTHON=$(realpath "$CUDA_VENV")/bin/python
"$CUDA_PYTHON" -m pip install -q "$CUDA_TORCH_SPEC" numpy pytest ninja expecttest hypothesis

# Build a copy of the sources, so the in-place CPU build of the checkout is left alone.
SRC=build/cuda-check/src
mkdir -p "$SRC"
cp -r setup.py pyproject.toml csrc torch_mha "$SRC"/
cp -r tests "$SRC"/
rm -f "$SRC"/torch_mha/_C*.so
LOG=build/cuda-check/build.log
echo "check_cuda_build: compiling for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs"
start=$(date +%s)
if ! (cd "$SRC" && FORCE_CUDA=1 NVCC_FLAGS="-Xptxas=-v" "$CUDA_PYTHON" setup.py \
      build_ext --inplace) >"$LOG" 2>&1; then
  grep -E "error|Error" "$LOG" | head -40 >&2 || tail -40 "$LOG" >&2
  echo "check_cuda_build: the CUDA build failed (full log: $LOG)" >&2
  exit 1
fi
echo "check_cuda_build: built in $(( $(date +%s) - start )) s"

"$CUDA_PYTHON" scripts/cuda_resources.py "$LOG" --fail-on-spills

# The CUDA-enabled library loads into the CUDA torch (no GPU needed) and its CPU path works.
(cd "$SRC" && "$CUDA_PYTHON" - <<'PY'
import torch
import torch_mha
assert torch_mha.cuda_version() > 0, "built without CUDA"
print("check_cuda_build: loaded", torch.ops.torch_mha._build_info(), "into torch", torch.__version__)
PY
)
(cd "$SRC" && "$CUDA_PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops_forward.py \
  tests/test_ops_backward.py -k "forward_shapes or backward_float64 or gradcheck" -x)
echo "check_cuda_build: OK"
