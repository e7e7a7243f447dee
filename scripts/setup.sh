#!/usr/bin/env bash
# Create .venv in the repository root and install CeVAEAnomaly (editable) with its test tools and
# the research extra (demo, evaluate, scripts).
# TORCH_SPEC pins PyTorch for this install (default torch==2.13.0, the CPU build used in CI);
# set e.g. TORCH_SPEC="torch>=2.1" to let pip choose a build for your machine (CUDA, MPS).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test,research]" "$TORCH_SPEC"
echo "CeVAEAnomaly is installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
