#!/usr/bin/env bash
# Install the project on a CPU-only machine. torch is pinned and installed first, so that the
# rest of the requirements (DeepSpeed, transformers) do not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[dev]"
