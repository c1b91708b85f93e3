#!/usr/bin/env bash
# Creates .venv (if needed) with torch and the test tools, then builds torch_mha into it.
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0, the CPU build),
# VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "$TORCH_SPEC" numpy pytest hypothesis ninja expecttest
# matplotlib: the loss-curve PNG of examples/train_lm.py (tests/test_examples.py runs it) and
# the plot of benchmarks/bench_attention.py (tests/test_bench.py runs it).
python -m pip install -q matplotlib
# transformers (pinned): the tests of the Hugging Face backend (torch_mha.hf) and the demo
# examples/generate_hf.py. torch_mha itself never needs it.
python -m pip install -q transformers==5.23.0
# CMake builds the LibTorch package for the C++ tests; take it from PyPI if the machine has none.
command -v cmake >/dev/null || python -m pip install -q cmake
# Build against the torch installed above: no build isolation.
python -m pip install -q --no-build-isolation -e .
python -c "import torch, torch_mha; print('torch', torch.__version__, '| torch_mha', torch_mha.__version__, '|', torch.ops.torch_mha._build_info())"
