#!/usr/bin/env bash
# One-shot GPU check of torch_mha (issue 13), sized for a short visit to a GPU machine: from the
# repository root,
#
#   bash benchmarks/gpu_check.sh                 # everything, in under 8 minutes (budget 450 s)
#   bash benchmarks/gpu_check.sh --dry-run       # CPU only: plan, drivers on tiny shapes, outputs
#   bash benchmarks/gpu_check.sh --budget 300 --skip-sanitize --out /tmp/check
#   bash benchmarks/gpu_check.sh --skip-build -- --dtypes bfloat16   # after --: benchmark args
#
# Options: --dry-run, --out DIR, --budget SECONDS, --skip-build, --skip-tests (both test runs),
# --skip-sanitize, --skip-bench, --quick (benchmark bfloat16 at L 1024 and 4096 only), -- ARGS
# (passed to benchmarks/gpu_check.py).
#
# Stages, one after the other (the phases of a stage run at the same time), each phase timed and
# under `timeout` (SIGINT first, so pytest and the Python drivers still write their results).
# A stage gets at most its cap and never more than the budget left less the minimum of every
# later stage; a phase that fails or runs out of time does not stop the later stages, and a
# stage with no time left is reported as skipped (docs/cuda.md, "The GPU check"):
#   probe      the machine's python3 (or $PYTHON) and its torch, the GPU, nvcc, compute-sanitizer,
#              ninja: nothing is installed (no network there).
#   build      (cap 240 s) FORCE_CUDA=1 python setup.py build_ext --inplace against that torch,
#              for TORCH_CUDA_ARCH_LIST = the local GPU's compute capability only (unless set),
#              MAX_JOBS = the cores, -Xptxas=-v (per-kernel registers and spills in the summary).
#              In place and offline: no pip, no build isolation, nothing fetched.
#   check      (cap 180 s) at the same time:
#     tests      pytest -m cuda (tests/test_cuda.py first, then every `cuda` case of the device-
#                parametrized suite), default routing, in shards (benchmarks/gpu_check_pytest.py)
#     tests-own  the float16/bfloat16 `cuda` cases with TORCH_MHA_CUDA_BACKEND=own (torch_mha's
#                own kernels instead of PyTorch's fused ones)
#     memcheck, racecheck, synccheck
#                compute-sanitizer --tool <tool> --kernel-name kns=torch_mha on
#                benchmarks/gpu_sanitize.py (every kernel and instantiation on small shapes, own
#                kernels); fails on any reported error
#   bench      (cap 150 s, alone) benchmarks/gpu_check.py: forward and forward + backward against
#              F.scaled_dot_product_attention and nn.MultiheadAttention, float16/bfloat16/float32,
#              head dims 64 and 128, L 1024 to 8192; stops starting configurations at its limit.
#   report     gpu_check.json and gpu_check.md (summary, failures, sanitizer results, benchmark
#              tables, ptxas resources) plus trimmed logs (build.log, tests.log, sanitize.log,
#              bench.log) in the output folder: $OUT if set, else --out, else build/gpu-check.
#              Full logs stay in build/gpu-check-work/.
#
# Without --dry-run and without a GPU it stops at once with one line and exit status 1.
# --dry-run (CPU, CI): prints the plan and the commands it would run, runs the sanitizer driver
# and the benchmark on the CPU on tiny shapes and the pytest runner and plugin on a collection,
# and writes the same outputs with the GPU phases marked "dry-run"; exit 0 if all of that worked.
# Exit status: 0 every phase ran and passed; 1 a phase failed (or, dry run, a CPU check failed);
# 2 nothing failed but a phase was cut short or skipped (time budget, a missing tool).
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds, default 450),
# GPU_CHECK_TEST_PROCS (test shards, default 8 on 16 cores), TORCH_CUDA_ARCH_LIST, MAX_JOBS, OUT.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

DRY_RUN=0
OUT_ARG=""
BUDGET=${GPU_CHECK_BUDGET:-450}
SKIP_BUILD=0
SKIP_TESTS=0
SKIP_SANITIZE=0
SKIP_BENCH=0
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_ARG=${2:?--out needs a folder}; shift ;;
    --out=*) OUT_ARG=${1#--out=} ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-sanitize) SKIP_SANITIZE=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --quick) BENCH_ARGS+=(--quick) ;;
    -h | --help) usage; exit 0 ;;
    --) shift; BENCH_ARGS+=("$@"); break ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 1 ;;
  esac
  shift
done
case "$BUDGET" in
  '' | *[!0-9]*) echo "gpu_check: --budget must be whole seconds, got '$BUDGET'" >&2; exit 1 ;;
esac

START=$(date +%s)
DEADLINE=$((START + BUDGET))
REPORT_RESERVE=15 # seconds kept for writing the report

# ---- Is there a GPU at all? (before anything slow)
has_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -q "^GPU "
  else
    ls /dev/nvidia[0-9]* >/dev/null 2>&1
  fi
}
if [ "$DRY_RUN" = 0 ] && ! has_gpu; then
  echo "gpu_check: no NVIDIA GPU found (nvidia-smi lists none, or no /dev/nvidia*); use --dry-run for the CPU check" >&2
  exit 1
fi

# ---- Folders. Outputs: at most 8 files (what a device visit brings back), logs trimmed.
if [ -n "${OUT:-}" ]; then
  OUT_DIR=$OUT
elif [ -n "$OUT_ARG" ]; then
  OUT_DIR=$OUT_ARG
else
  OUT_DIR=build/gpu-check
fi
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$REPO/build/gpu-check-work
rm -rf "$WORK"
mkdir -p "$WORK"
PHASES=$WORK/phases.tsv
COMMANDS=$WORK/commands.txt
: >"$PHASES"
: >"$COMMANDS"

# ---- Python: the machine's own (no virtual environment, nothing installed)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  PY=$(command -v python3 || command -v python || true)
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no python3 found; set PYTHON" >&2
  exit 1
fi
# Tools installed with that python (ninja, pytest) may live next to it, off the PATH.
PY_SCRIPTS=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
[ -n "$PY_SCRIPTS" ] && PATH="$PY_SCRIPTS:$PATH"
export PATH
export PYTHONPATH="$REPO:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
CORES=$(nproc 2>/dev/null || echo 4)

say() {
  printf 'gpu_check [%4ss] %s\n' "$(($(date +%s) - START))" "$*"
}

# record NAME STATUS SECONDS LIMIT DETAIL
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$PHASES"
}

# Stages run one after the other; the phases of a stage run at the same time, each under the
# stage's limit: the CUDA tests (default routing, in shards, and the own-kernel run) and the
# three sanitizer tools share the machine's cores and the GPU (nothing there is timed); the
# benchmark runs alone. A stage gets at most its cap, and never more than the budget left after
# the report's reserve and the minimum of every later stage; with less than its minimum left it
# is skipped. The caps add up to more than the budget on purpose: the benchmark, last, takes
# what the others left (it stops starting configurations at its limit).
STAGES=(build check bench)
declare -A MEMBERS=([build]="build" [check]="tests tests-own memcheck racecheck synccheck"
  [bench]="bench")
declare -A CAP=([build]=240 [check]=180 [bench]=150)
declare -A MIN=([build]=60 [check]=45 [bench]=40)
declare -A ENABLED=()
for stage in "${STAGES[@]}"; do
  for phase in ${MEMBERS[$stage]}; do ENABLED[$phase]=1; done
done
[ "$SKIP_BUILD" = 1 ] && ENABLED[build]=0
[ "$SKIP_TESTS" = 1 ] && ENABLED[tests]=0 && ENABLED[tests-own]=0
[ "$SKIP_SANITIZE" = 1 ] && ENABLED[memcheck]=0 && ENABLED[racecheck]=0 && ENABLED[synccheck]=0
[ "$SKIP_BENCH" = 1 ] && ENABLED[bench]=0

stage_enabled() {
  local phase
  for phase in ${MEMBERS[$1]}; do
    [ "${ENABLED[$phase]}" = 1 ] && return 0
  done
  return 1
}

# The seconds stage $1 may use from now (see above).
stage_limit() {
  local stage=$1 later=0 seen=0 s
  for s in "${STAGES[@]}"; do
    if [ "$seen" = 1 ] && stage_enabled "$s"; then
      later=$((later + MIN[$s]))
    fi
    [ "$s" = "$stage" ] && seen=1
  done
  local left=$((DEADLINE - REPORT_RESERVE - $(date +%s) - later))
  local cap=${CAP[$stage]}
  echo $((left < cap ? left : cap))
}

# begin_stage STAGE: sets LIMIT, or records the stage's phases as skipped and returns 1.
begin_stage() {
  local stage=$1 phase
  LIMIT=$(stage_limit "$stage")
  if ! stage_enabled "$stage" || [ "$LIMIT" -lt "${MIN[$stage]}" ]; then
    for phase in ${MEMBERS[$stage]}; do
      if [ "${ENABLED[$phase]}" != 1 ]; then
        record "$phase" off 0 0 "skipped on request"
      else
        record "$phase" skipped 0 "$LIMIT" "time budget: ${LIMIT} s left, the stage needs ${MIN[$stage]}"
        say "$phase: skipped (time budget)"
      fi
    done
    return 1
  fi
  return 0
}

STATUS_FILE=$WORK/status
echo 0 >"$STATUS_FILE"

# run_phase NAME LIMIT LOG COMMAND...: runs COMMAND for at most LIMIT seconds (SIGINT at the
# limit, SIGKILL 15 s later), appending to LOG; records the phase (ok / failed / timeout, or
# skipped when disabled) and returns the command's status. GPU_CHECK_DEADLINE tells the pytest
# plugin and the benchmark when to stop starting new work.
run_phase() {
  local name=$1 limit=$2 log=$3
  shift 3
  printf '%s\n' "$*" >>"$COMMANDS"
  if [ "${ENABLED[$name]}" != 1 ]; then
    record "$name" off 0 0 "skipped on request"
    return 0
  fi
  say "$name: up to ${limit} s: $*"
  local begin rc=0 status
  begin=$(date +%s)
  printf '==== %s: %s\n==== limit %s s\n' "$name" "$*" "$limit" >>"$log"
  GPU_CHECK_DEADLINE=$((begin + limit - 10)) timeout -s INT -k 15 "$limit" "$@" >>"$log" 2>&1 ||
    rc=$?
  local took=$(($(date +%s) - begin))
  case "$rc" in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "==== $name: exit $rc after ${took} s" >>"$log"
  record "$name" "$status" "$took" "$limit" "exit $rc"
  say "$name: $status (exit $rc, ${took} s)"
  return "$rc"
}

# ---- probe
say "output: $OUT_DIR; budget ${BUDGET} s; python $PY; ${CORES} cores$([ "$DRY_RUN" = 1 ] && echo '; DRY RUN')"
probe_begin=$(date +%s)
if [ "$DRY_RUN" = 1 ]; then
  PROBE_DEVICE=none
else
  PROBE_DEVICE=cuda
fi
# Imports torch (the first time, the slowest part of the probe); stops here when it cannot.
if ! "$PY" benchmarks/gpu_check_report.py probe --device "$PROBE_DEVICE" --json "$WORK/probe.json" \
  >"$WORK/probe.log" 2>&1; then
  if grep -q "^GPU: " "$WORK/probe.log"; then
    echo "gpu_check: torch cannot use the GPU: $(grep "^GPU: " "$WORK/probe.log" | cut -c6-)" >&2
  else
    echo "gpu_check: $PY cannot import torch: $(tail -n 1 "$WORK/probe.log")" >&2
  fi
  exit 1
fi
cat "$WORK/probe.log"
record probe ok $(($(date +%s) - probe_begin)) 0 "$(tail -n 1 "$WORK/probe.log")"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('arch_list') or '')" "$WORK/probe.json" 2>/dev/null)
fi
if [ -z "$TORCH_CUDA_ARCH_LIST" ]; then
  TORCH_CUDA_ARCH_LIST="<the local GPU's capability, e.g. 9.0>"
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$CORES}

# The CUDA tests spend most of their time on the CPU (references, gradcheck, Python): the
# default-routing run is split into TEST_PROCS processes (shards of one selection) on the one
# GPU, next to the own-kernel run and the sanitizers, one thread each.
TEST_PROCS=${GPU_CHECK_TEST_PROCS:-$((CORES >= 16 ? 8 : (CORES >= 4 ? CORES / 2 : 1)))}
TEST_THREADS=1
PYTEST_ARGS=(-p no:cacheprovider -q -o addopts= -rfE --tb=short)
# tests/test_cuda.py first (the CUDA-only tests), then the device-parametrized cuda cases.
CUDA_TESTS=(-m cuda tests/test_cuda.py tests)
TESTS_DEFAULT=("$PY" benchmarks/gpu_check_pytest.py --procs "$TEST_PROCS" --threads "$TEST_THREADS"
  --results "$WORK/tests_default.json" -- "${PYTEST_ARGS[@]}" "${CUDA_TESTS[@]}")
TESTS_OWN=(env TORCH_MHA_CUDA_BACKEND=own "$PY" benchmarks/gpu_check_pytest.py --procs 1
  --threads "$TEST_THREADS" --results "$WORK/tests_own.json" -- "${PYTEST_ARGS[@]}"
  "${CUDA_TESTS[@]}" -k float16)
# -Xptxas=-v: every kernel's registers and spills for the report. --split-compile=0 (nvcc 11.8
# and newer; passed on to ptxas): device optimisation and code generation on as many threads as
# there are CPUs. attention_cuda.cu holds every kernel instantiation in one translation unit, the
# longest compile of the build; single-threaded it took 4 minutes of CPU on the 2-core CI machine.
NVCC_BIN=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
BUILD_NVCC_FLAGS="-Xptxas=-v"
if "$NVCC_BIN" --help 2>/dev/null | grep -q -- "--split-compile "; then
  BUILD_NVCC_FLAGS+=" --split-compile=0"
fi
BUILD=(env FORCE_CUDA=1 "NVCC_FLAGS=$BUILD_NVCC_FLAGS ${NVCC_FLAGS:-}" "$PY" setup.py build_ext
  --inplace)
BENCH=("$PY" benchmarks/gpu_check.py --json "$WORK/bench.json" --markdown "$WORK/bench.md"
  "${BENCH_ARGS[@]}")
SANITIZER_TOOLS=(memcheck racecheck synccheck)
# compute-sanitizer on the driver: only torch_mha's kernels instrumented (kns: kernel name
# substring), API errors left to the driver (which fails a case on any exception).
sanitizer_command() { # TOOL: sets SANITIZE
  SANITIZE=(env OMP_NUM_THREADS=1 compute-sanitizer --tool "$1" --kernel-name kns=torch_mha
    --report-api-errors no --print-limit 100 --error-exitcode 99 "$PY" benchmarks/gpu_sanitize.py
    --json "$WORK/sanitize_$1.json")
}

if [ "$DRY_RUN" = 1 ]; then
  # ---- dry run: what would run, then every check a CPU can do.
  say "plan for a ${BUDGET} s budget (stages in order; the phases of a stage run together):"
  for stage in "${STAGES[@]}"; do
    say "  $stage (${MEMBERS[$stage]}): cap ${CAP[$stage]} s, at least ${MIN[$stage]} s"
  done
  {
    echo "TORCH_CUDA_ARCH_LIST='$TORCH_CUDA_ARCH_LIST' MAX_JOBS=$MAX_JOBS ${BUILD[*]}"
    echo "${TESTS_DEFAULT[*]}"
    echo "${TESTS_OWN[*]}"
    for tool in "${SANITIZER_TOOLS[@]}"; do
      sanitizer_command "$tool"
      echo "${SANITIZE[*]}"
    done
    echo "${BENCH[*]}"
  } >>"$COMMANDS"
  say "would run:"
  sed 's/^/    /' "$COMMANDS"
  for stage in "${STAGES[@]}"; do
    for phase in ${MEMBERS[$stage]}; do
      if [ "${ENABLED[$phase]}" = 1 ]; then
        record "$phase" dry-run 0 "${CAP[$stage]}" "not run: dry run"
      else
        record "$phase" off 0 0 "skipped on request"
      fi
    done
  done
  ENABLED+=([cpu-pytest]=1 [cpu-sanitize]=1 [cpu-bench]=1)
  COMMANDS=$WORK/commands_cpu.txt # the report lists the GPU commands; these are in the logs
  # The pytest runner (2 shards) and plugin on a real collection (every CUDA test is skipped
  # here), the sanitizer driver and the benchmark on the CPU.
  run_phase cpu-pytest 120 "$WORK/tests_default.log" "$PY" benchmarks/gpu_check_pytest.py \
    --procs 2 --threads 1 --results "$WORK/tests_default.json" -- "${PYTEST_ARGS[@]}" -m cuda \
    tests/test_cuda.py || echo 1 >"$STATUS_FILE"
  run_phase cpu-sanitize 120 "$WORK/sanitize_cpu.log" "$PY" benchmarks/gpu_sanitize.py \
    --device cpu --json "$WORK/sanitize_cpu.json" || echo 1 >"$STATUS_FILE"
  run_phase cpu-bench 120 "$WORK/bench.log" "$PY" benchmarks/gpu_check.py --device cpu \
    --json "$WORK/bench.json" --markdown "$WORK/bench.md" "${BENCH_ARGS[@]}" ||
    echo 1 >"$STATUS_FILE"
else
  # ---- build
  if begin_stage build; then
    run_phase build "$LIMIT" "$WORK/build.log" "${BUILD[@]}"
  fi
  if ! "$PY" -c "import sys, torch_mha; sys.exit(torch_mha.cuda_version() < 0)" \
    >>"$WORK/build.log" 2>&1; then
    say "torch_mha does not load with its CUDA kernels: the GPU phases cannot run"
    for phase in tests tests-own memcheck racecheck synccheck bench; do
      [ "${ENABLED[$phase]}" = 1 ] && record "$phase" skipped 0 0 "torch_mha has no CUDA kernels"
      ENABLED[$phase]=0
    done
  fi

  # ---- CUDA tests (default routing, sharded; torch_mha's own kernels for the float16/bfloat16
  # cases) and compute-sanitizer's three tools, all at the same time
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in "${SANITIZER_TOOLS[@]}"; do
      [ "${ENABLED[$tool]}" = 1 ] && record "$tool" skipped 0 0 "compute-sanitizer not found"
      ENABLED[$tool]=0
    done
  fi
  if begin_stage check; then
    run_phase tests "$LIMIT" "$WORK/tests_default.log" "${TESTS_DEFAULT[@]}" &
    run_phase tests-own "$LIMIT" "$WORK/tests_own.log" "${TESTS_OWN[@]}" &
    for tool in "${SANITIZER_TOOLS[@]}"; do
      sanitizer_command "$tool"
      run_phase "$tool" "$LIMIT" "$WORK/sanitize_$tool.log" "${SANITIZE[@]}" &
    done
    wait
  fi

  # ---- benchmark (alone on the machine)
  if begin_stage bench; then
    run_phase bench "$LIMIT" "$WORK/bench.log" "${BENCH[@]}"
  fi
fi

# ---- report
say "report: $OUT_DIR"
DRY_FLAG=()
[ "$DRY_RUN" = 1 ] && DRY_FLAG=(--dry-run)
"$PY" benchmarks/gpu_check_report.py report --work "$WORK" --out "$OUT_DIR" --budget "$BUDGET" \
  --started "$START" --arch "$TORCH_CUDA_ARCH_LIST" "${DRY_FLAG[@]}"
rc=$?
if [ "$(cat "$STATUS_FILE")" != 0 ] && [ "$rc" = 0 ]; then
  rc=1
fi
say "done: exit $rc; in $OUT_DIR: $(cd "$OUT_DIR" && echo *)"
exit "$rc"
