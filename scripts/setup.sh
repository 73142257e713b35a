#!/usr/bin/env bash
# Creates .venv (once) and installs ditkit into it.  Without a GPU it takes the CPU wheel of torch
# 2.13.0 first, so that pip never pulls a multi-GB CUDA build; with a GPU pip keeps/gets a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install -q torch
    else
        .venv/bin/pip install -q torch==2.13.0
    fi
fi
.venv/bin/pip install -q -e ".[${DITKIT_EXTRAS:-test}]"
