#!/usr/bin/env bash
# Creates .venv and installs adaptkit with its test extras and the example third-party plugin
# (so the tests check entry-point discovery for real). Where no NVIDIA GPU is present, torch is
# pinned first to a release that this project's machines keep as a CPU build; set TORCH_SPEC to
# choose another (for example a CPU wheel from your own index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev,reasoning]" -e examples/adaptkit-example-plugin
