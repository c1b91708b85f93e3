#!/usr/bin/env bash
# GPU check of torch_mha's CUDA kernels (issue #4), on a machine with an NVIDIA GPU, from the
# repository root:
#
#   bash benchmarks/gpu_check.sh                 # build, CUDA tests, benchmark
#   bash benchmarks/gpu_check.sh --quick         # the same with a smaller benchmark
#   bash benchmarks/gpu_check.sh --skip-build --skip-tests --iters 20   # benchmark only
#
# 1. Python: the current python (or $PYTHON) if its torch sees a GPU; otherwise the virtual
#    environment $CUDA_VENV (default .venv-cuda), created or refreshed with $CUDA_TORCH_SPEC
#    (default torch==2.14.1, PyPI's CUDA build; TORCH_INDEX_URL picks another wheel index, e.g.
#    https://download.pytorch.org/whl/cu126 for an older driver). Prints the GPU and the driver.
# 2. Builds torch_mha with its CUDA kernels into the checkout
#    (FORCE_CUDA=1 pip install --no-build-isolation -e .), for TORCH_CUDA_ARCH_LIST = the
#    GPUs' compute capabilities unless it is set. This replaces the checkout's CPU-only build:
#    run scripts/setup_env.sh afterwards to go back to the CPU venv.
# 3. Runs the CUDA tests: `pytest -m cuda tests` (tests/test_cuda.py and every `cuda` case of
#    the device-parametrized tests, which carry the marker), then `pytest tests -k cuda -m "not
#    cuda"` for any other test with "cuda" in its name.
# 4. Runs benchmarks/gpu_check.py (torch_mha vs F.scaled_dot_product_attention and
#    nn.MultiheadAttention; a short table, JSON in benchmarks/out/gpu_check.json). Arguments
#    other than --skip-build/--skip-tests/--skip-bench go to it.
#
# Without a GPU it stops at once with one line and exit status 1. Otherwise every step runs and
# the exit status is 1 if any failed (logs in build/gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "gpu_check: $*" >&2
  exit 1
}

SKIP_BUILD=0
SKIP_TESTS=0
SKIP_BENCH=0
BENCH_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    *) BENCH_ARGS+=("$arg") ;;
  esac
done

# ---- 0. Is there a GPU at all? (fast, before any install)
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
    die "no NVIDIA GPU found (nvidia-smi lists none)"
  fi
elif ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  die "no NVIDIA GPU found (no nvidia-smi, no /dev/nvidia*)"
fi

LOGS=build/gpu-check
mkdir -p "$LOGS"

# ---- 1. A Python whose torch sees the GPU
torch_sees_gpu() {
  "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
PY=""
for candidate in "${PYTHON:-}" python python3 "$CUDA_VENV/bin/python"; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && torch_sees_gpu "$candidate"; then
    PY=$(command -v "$candidate")
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no Python here has a torch that sees the GPU; setting up $CUDA_VENV with $CUDA_TORCH_SPEC"
  if [ ! -x "$CUDA_VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$CUDA_VENV" || die "could not create $CUDA_VENV"
  fi
  PY=$(realpath "$CUDA_VENV")/bin/python
  INDEX=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    INDEX=(--index-url "$TORCH_INDEX_URL")
  fi
  "$PY" -m pip install -q --upgrade pip >"$LOGS/pip.log" 2>&1
  "$PY" -m pip install -q --upgrade ${INDEX[@]+"${INDEX[@]}"} "$CUDA_TORCH_SPEC" \
    >>"$LOGS/pip.log" 2>&1 || die "pip could not install $CUDA_TORCH_SPEC (log: $LOGS/pip.log)"
  if ! torch_sees_gpu "$PY"; then
    version=$("$PY" -c 'import torch; print(torch.__version__, "with CUDA", torch.version.cuda)')
    die "torch $version does not see the GPU (driver too old? set CUDA_TORCH_SPEC/TORCH_INDEX_URL)"
  fi
fi
# Build and test tools (no-ops when present).
"$PY" -m pip install -q setuptools wheel ninja numpy pytest hypothesis expecttest \
  >>"$LOGS/pip.log" 2>&1 || die "pip could not install the build/test tools (log: $LOGS/pip.log)"

"$PY" - <<'PY' || die "torch cannot use the GPU"
import subprocess
import sys

import torch

def driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"

print(f"gpu_check: python {sys.executable}")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, driver {driver()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu_check: cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
torch.ones(1, device="cuda").add_(1)  # the GPU really runs a kernel
PY

STATUS=0
step_failed() {
  echo "gpu_check: FAILED: $*" >&2
  STATUS=1
}

# ---- 2. Build with the CUDA kernels
if [ "$SKIP_BUILD" = 0 ]; then
  if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
    die "nvcc not found: install the CUDA toolkit matching torch's CUDA (or set CUDA_HOME)"
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "
import torch
caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(';'.join(f'{major}.{minor}' for major, minor in caps))")
    export TORCH_CUDA_ARCH_LIST
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "gpu_check: building torch_mha for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST ($MAX_JOBS jobs)"
  start=$(date +%s)
  if FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation -e . >"$LOGS/build.log" 2>&1; then
    echo "gpu_check: built in $(($(date +%s) - start)) s (log: $LOGS/build.log)"
  else
    grep -E "error|Error" "$LOGS/build.log" | head -30 >&2
    die "the CUDA build failed (log: $LOGS/build.log)"
  fi
fi
"$PY" -c "
import torch, torch_mha, sys
if torch_mha.cuda_version() < 0:
    sys.exit('torch_mha is a CPU-only build: run without --skip-build')
print('gpu_check: torch_mha', torch.ops.torch_mha._build_info())
" || die "torch_mha does not load with its CUDA kernels"

# ---- 3. The CUDA tests
if [ "$SKIP_TESTS" = 0 ]; then
  echo "gpu_check: pytest -m cuda tests"
  "$PY" -m pytest -m cuda tests -q -p no:cacheprovider -rfEs 2>&1 | tee "$LOGS/pytest_cuda.log"
  [ "${PIPESTATUS[0]}" = 0 ] || step_failed "pytest -m cuda tests (log: $LOGS/pytest_cuda.log)"
  echo "gpu_check: pytest tests -k cuda -m 'not cuda'"
  "$PY" -m pytest tests -k cuda -m "not cuda" -q -p no:cacheprovider -rfE 2>&1 |
    tee "$LOGS/pytest_k_cuda.log"
  rc=${PIPESTATUS[0]}
  # 5: nothing selected (every CUDA test carries the marker), which is fine.
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || step_failed "pytest tests -k cuda (log: $LOGS/pytest_k_cuda.log)"
fi

# ---- 4. The benchmark
if [ "$SKIP_BENCH" = 0 ]; then
  "$PY" benchmarks/gpu_check.py ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} ||
    step_failed "benchmarks/gpu_check.py"
fi

if [ "$STATUS" = 0 ]; then
  echo "gpu_check: OK"
fi
exit "$STATUS"
