#!/usr/bin/env bash
# Install the project on a CPU-only machine. torch is pinned and installed first, so that the
# rest of the requirements (DeepSpeed, transformers) do not pull a multi-GB CUDA build. Where
# torch already sees a GPU (test.sh or quickstart.sh on a GPU machine) that torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore  # CI and containers install as root
"$PY" -m pip install -q --upgrade pip
if cuda_torch=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.__version__)" \
    2>/dev/null); then
  echo "torch $cuda_torch sees a GPU here: keeping it (not installing the CPU build torch==2.13.0)"
else
  "$PY" -m pip install -q torch==2.13.0
fi
# Editable, so the checkout is what runs. setuptools announces every editable install with an
# informational UserWarning; a plain `pip install .` prints no warning at all.
PYTHONWARNINGS=ignore::UserWarning "$PY" -m pip install -q -e ".[dev,deploy,s3,faiss]"
# CLIP_benchmark, for running its own evaluation functions on vlp checkpoints (and the test that
# compares them with `vlp eval`). Its package metadata pulls torchvision and open_clip, which have
# no CPU build here; the metric modules need only torch and scikit-learn (in the dev extra).
"$PY" -m pip install -q --no-deps clip-benchmark==1.6.2
