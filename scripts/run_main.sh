#!/usr/bin/env bash
# The main job: set up, then train a small character-level Transformer language model on the
# bundled corpus twice, with torch.nn.MultiheadAttention and with torch_mha, from the same weights
# and data order; print losses, speed-up and memory, plot the loss curves, export the torch_mha
# model with TorchScript, reload it and generate a sample. Extra arguments go to
# examples/train_lm.py (--seconds, --length, --d-model, --heads, --layers, --threads, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python examples/train_lm.py "$@"
