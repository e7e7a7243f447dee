#!/usr/bin/env bash
# Create .venv in the repository root and install CeVAEAnomaly (editable) with its test tools and
# the research extra (demo, evaluate, scripts).
# By default PyTorch is torch==2.13.0, its CPU build, from PyTorch's CPU index (PyPI's Linux build of
# the same version is the CUDA one, several GB; where pip is set up to find a local CPU wheel, as on
# the CI machines, that one is used). Set e.g. TORCH_SPEC="torch>=2.1" to let pip choose a build for
# your machine from PyPI (CUDA, MPS).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${TORCH_SPEC:-}" ]; then
  TORCH_SPEC=torch==2.13.0
  # --retries 0: where that index cannot be reached, pip goes on at once with the wheels it finds elsewhere
  TORCH_FROM="--index-url https://download.pytorch.org/whl/cpu --retries 0"
else
  TORCH_FROM=""
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # TORCH_FROM is a list of options
.venv/bin/python -m pip install --quiet $TORCH_FROM "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test,research]" "$TORCH_SPEC"
echo "CeVAEAnomaly is installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
