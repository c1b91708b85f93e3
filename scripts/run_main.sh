#!/usr/bin/env bash
# The main job: set up, then compare torch_mha with torch.nn.MultiheadAttention on the built-in
# default workload (accuracy and speed). Extra arguments go to benchmarks/compare_with_nn.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python benchmarks/compare_with_nn.py "$@"
