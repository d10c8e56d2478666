#!/usr/bin/env bash
# Download into .whl/ the packages vlp needs that a bare CUDA image (PyTorch, transformers, ...)
# lacks, for Python 3.12 on x86-64 Linux, at the versions installed here. gpu_check.sh installs
# them from there (no index needed on the GPU machine). Run where pip reaches an index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
# DeepSpeed ships as a source archive only; it installs without building ops (DS_BUILD_OPS=0).
"$PY" -m pip download -q --no-deps -d .whl "deepspeed==$(version deepspeed)"
binary=(hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand)
pinned=()
for name in "${binary[@]}"; do pinned+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pinned[@]}"
ls -la .whl
