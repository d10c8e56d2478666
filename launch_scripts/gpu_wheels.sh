#!/usr/bin/env bash
# Put into .whl/ what vlp needs beyond a CUDA image with PyTorch, as wheels for x86-64 Linux and
# CPython $PYTHONS, at the versions installed here; gpu_check.sh installs from there with no
# index. Run where pip reaches an index.
#
# - DeepSpeed ships as a source archive only, whose build wants nvcc on many images: it is built
#   here into a pure-Python wheel with DS_BUILD_OPS=0 (its ops compile on first use).
# - Its runtime requirements except torch (without einops or msgpack `import deepspeed` fails),
#   pydantic's, and webdataset with its own (tests/test_gpu_scripts.py keeps this list complete
#   from the installed packages' metadata).
# - .whl/ is git-ignored: a copy of the working tree made from git carries it only when asked
#   (a runner that copies the working tree to a GPU machine must be told to carry `.whl`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTHONS=${PYTHONS:-"3.11 3.12 3.13"}
PACKAGES=(einops hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic tqdm
  pydantic-core annotated-types typing-extensions typing-inspection
  webdataset braceexpand pyyaml)
mkdir -p .whl
version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl \
  "deepspeed==$(version deepspeed)"
pinned=()
for name in "${PACKAGES[@]}"; do pinned+=("$name==$(version "$name")"); done
for python in $PYTHONS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$python" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pinned[@]}"
done
ls -la .whl
