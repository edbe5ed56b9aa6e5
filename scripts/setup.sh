#!/usr/bin/env bash
# Create .venv (or $NEOXRAY_VENV) and install neoxray with its test dependencies into it.
# Idempotent: reinstalls only when pyproject.toml changed. On a machine without an NVIDIA GPU it installs the
# CPU build of PyTorch (the default PyPI wheel for Linux is a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEOXRAY_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${NEOXRAY_TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.neoxray-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    "${pip[@]}" install -q "torch==$TORCH_VERSION"
  else
    echo "[setup] no GPU: installing the CPU build of torch==$TORCH_VERSION"
    cpu_index="https://download.pytorch.org/whl/cpu"
    if curl -fsS -m 5 -o /dev/null "$cpu_index/torch/" 2>/dev/null; then
      "${pip[@]}" install -q "torch==$TORCH_VERSION" --index-url "$cpu_index"
    else  # offline mirrors / local wheel caches (pip's own configuration decides)
      "${pip[@]}" install -q "torch==$TORCH_VERSION"
    fi
  fi
fi
echo "[setup] installing neoxray and its dependencies into $VENV"
"${pip[@]}" install -q -e ".[test]"
touch "$stamp"
