#!/usr/bin/env bash
# The CPU demo of the whole pipeline on the built-in dead-leaves set.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-demo_out}
mkdir -p "$OUT"
"$PY" data.py show --resolution 32 --out "$OUT/deadleaves_classes.png"
"$PY" fft_ops.py
echo "stages 1-3 (train_vae.py, train_diffusion.py, evaluate.py): not yet available"
