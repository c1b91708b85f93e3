#!/usr/bin/env bash
# Builds libtorch_mha and the LibTorch test programs (tests/cpp) with AddressSanitizer and
# UndefinedBehaviorSanitizer (gcc's -fsanitize=address,undefined: no extra package), runs them,
# and fails on any failed check or any sanitizer report.
#
#   bash scripts/sanitize.sh        # in an environment where `python -c "import torch"` works
#
# Environment: PYTHON (default python), SANITIZE_BUILD (default build/sanitize: reused between
# runs, so only the first build of the library takes minutes), MAX_JOBS (default: all cores),
# SANITIZE_ISAS (default: every kernel build this CPU can run, e.g. "default avx2 avx512").
#
# What runs:
#  * tests/cpp/test_sanitize: the CPU kernels forward and backward on odd sizes, every dtype,
#    mask kind, layout, causal, dropout, weights, empty dimensions and nested parallel regions,
#    checked against ATen; once per kernel build (ATEN_CPU_CAPABILITY selects it);
#  * tests/cpp/test_api and test_jit_load, with the data and checks of tests/test_cpp.py.
# Only torch_mha (library, kernels and the PyTorch headers they instantiate) and the test
# programs are instrumented; libtorch is not, and the Python interpreter cannot load this build.
#
# Sanitizer options, and why:
#  * halt_on_error=1, exitcode=23 (ASan) / 24 (UBSan), with -fno-sanitize-recover=undefined at
#    compile time: the first report stops the program with a non-zero status; the log is also
#    searched for reports, and any report fails the script.
#  * LeakSanitizer stays on (detect_leaks=1) and so does ODR-violation detection: libtorch's
#    static initialisers produced no leak report and no ODR report with this build. Where
#    LeakSanitizer cannot run (it needs ptrace-like access, missing in some containers), set
#    SANITIZE_DETECT_LEAKS=0.
#  * detect_stack_use_after_return=1, check_initialization_order=1, strict_string_checks=1:
#    extra ASan checks, free for programs this size.
# Before building, a self-check compiles three tiny faulty programs (heap overflow, signed
# overflow, leak) with the same flags and options and requires each to be stopped with a report,
# so a broken sanitizer setup cannot pass silently (their reports go to $BUILD/selfcheck.log).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python}
BUILD=${SANITIZE_BUILD:-build/sanitize}
case "$BUILD" in /*) ;; *) BUILD="$REPO/$BUILD" ;; esac
JOBS=${MAX_JOBS:-$(nproc)}
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"

TORCH_PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
GENERATOR=()
if command -v ninja >/dev/null; then
  GENERATOR=(-G Ninja)
fi

export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:exitcode=23:detect_leaks=${SANITIZE_DETECT_LEAKS:-1}:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=0:exitcode=24:print_stacktrace=1"
mkdir -p "$BUILD/selfcheck"
LOG="$BUILD/run.log"
: >"$LOG"

echo "== self-check: faulty programs must be stopped with a report"
: >"$BUILD/selfcheck.log"
selfcheck() {  # name, expected report, program source
  local binary="$BUILD/selfcheck/$1"
  printf '%s\n' "$3" >"$binary.cpp"
  # shellcheck disable=SC2086
  c++ -O0 -g $FLAGS "$binary.cpp" -o "$binary"
  local rc=0
  "$binary" >>"$BUILD/selfcheck.log" 2>&1 || rc=$?
  if [ "$rc" = "0" ] || ! grep -q "$2" "$BUILD/selfcheck.log"; then
    echo "sanitizer self-check failed: $1 was not stopped with '$2' (exit $rc)"
    exit 1
  fi
  echo "$1: stopped with exit $rc"
}
selfcheck heap_overflow "heap-buffer-overflow" \
  '#include <vector>
int main(int argc, char**) { std::vector<int> v(4); return v.data()[argc + 3]; }'
selfcheck signed_overflow "signed integer overflow" \
  '#include <climits>
int main(int argc, char**) { int x = INT_MAX - 1 + argc; return x + argc > 0 ? 0 : 1; }'
if [ "${SANITIZE_DETECT_LEAKS:-1}" != "0" ]; then
  selfcheck leak "detected memory leaks" \
    'int* volatile sink;
int main() { sink = new int[10]; sink = nullptr; return 0; }'
fi

echo "== build libtorch_mha with -DTORCH_MHA_SANITIZE=ON ($BUILD/library)"
cmake -S . -B "$BUILD/library" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTORCH_MHA_SANITIZE=ON -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >/dev/null
cmake --build "$BUILD/library" --parallel "$JOBS"
cmake --install "$BUILD/library" --prefix "$BUILD/install" >/dev/null

echo "== build tests/cpp with $FLAGS ($BUILD/programs)"
cmake -S tests/cpp -B "$BUILD/programs" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$FLAGS" -DCMAKE_EXE_LINKER_FLAGS="$FLAGS" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$BUILD/install" >/dev/null
cmake --build "$BUILD/programs" --parallel "$JOBS"


if [ -z "${SANITIZE_ISAS:-}" ]; then
  case $("$PYTHON" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())') in
    AVX512) SANITIZE_ISAS="default avx2 avx512" ;;
    AVX2) SANITIZE_ISAS="default avx2" ;;
    *) SANITIZE_ISAS="default" ;;
  esac
fi
status=0
for isa in $SANITIZE_ISAS; do
  echo "== test_sanitize, ATEN_CPU_CAPABILITY=$isa"
  if ! ATEN_CPU_CAPABILITY=$isa "$BUILD/programs/test_sanitize" >>"$LOG" 2>&1; then
    echo "test_sanitize failed (ATEN_CPU_CAPABILITY=$isa)"
    status=1
  fi
  tail -n 1 "$LOG"
done

echo "== test_api and test_jit_load with the data of tests/test_cpp.py"
if ! BUILD="$BUILD" "$PYTHON" - >>"$LOG" 2>&1 <<'EOF'; then
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, "tests")
import test_cpp  # noqa: E402  (its data, reference results and checks, run on this build)

run_program = test_cpp.run_program


def run_and_show(program, *args):
    report = run_program(program, *args)
    print(f"--- {program.name}\n{report}")
    return report


test_cpp.run_program = run_and_show
programs = {name: Path(os.environ["BUILD"]) / "programs" / name for name in ("test_jit_load", "test_api")}
with tempfile.TemporaryDirectory() as tmp:
    test_cpp.test_scripted_model_forward_backward_and_step_in_cpp(programs, Path(tmp))
    test_cpp.test_cpp_api_with_autograd(programs, Path(tmp))
print("test_api and test_jit_load: 0 failure(s)")
EOF
  echo "test_api / test_jit_load failed"
  status=1
fi
tail -n 1 "$LOG"

reports=$(grep -cE "ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG" || true)
echo "== sanitizer reports: $reports (full log: $LOG)"
if [ "$reports" != "0" ]; then
  grep -E -A 30 "ERROR: (Address|Leak)Sanitizer|runtime error:" "$LOG" | head -n 200
  status=1
fi
if [ "$status" != "0" ]; then
  grep -E "FAILED|failure\(s\)|Error|error" "$LOG" | head -n 50 || true
fi
exit "$status"
