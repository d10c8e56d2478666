#!/usr/bin/env bash
# Install, then run the whole pipeline on the synthetic world: render -> serve -> img2dataset
# shards -> index -> tokenizer -> ZeRO-3 pretraining on 2 ranks (deepspeed launcher) -> retrieval
# and VQA evaluation -> summary table. Extra arguments go to `vlp quickstart` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch_scripts/install_cpu.sh
exec vlp quickstart "$@"
