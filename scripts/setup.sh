#!/usr/bin/env bash
# Creates .venv and installs adaptkit with its test extras. CPU-only torch where no NVIDIA GPU is
# present (the CUDA build is several GB); the example third-party plugin is installed too, so the
# tests can check entry-point discovery for real.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]" -e examples/adaptkit-example-plugin
