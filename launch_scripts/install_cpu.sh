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
# DeepSpeed compiles the ops the CPU path uses (CPU Adam for optimizer offload, the shared-memory
# collectives) the first time a job needs them: about two minutes under load, inside whichever
# job or test comes first. Build them here, once per machine; later calls load the cached build.
if [ -z "${cuda_torch:-}" ] && ! built=$("$PY" - 2>&1 <<'PYTHON'
from deepspeed.accelerator import get_accelerator

for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
    get_accelerator().create_op_builder(name).load(verbose=False)
PYTHON
); then
  echo "warning: DeepSpeed's CPU ops did not build (jobs will retry; \`vlp doctor\` checks):"
  echo "$built" | tail -5
fi
