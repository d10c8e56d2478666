#!/usr/bin/env bash
# One node, N ranks, through the real deepspeed launcher.
#   NPROC=8 RECIPE=pipeline/recipes/tiny_synth.yaml bash launch_scripts/train_local.sh run_dir=runs/x
# Extra arguments are config overrides (section.key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
exec deepspeed --num_accelerators "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" \
  pipeline/train.py --recipe "${RECIPE:-pipeline/recipes/tiny_synth.yaml}" --set "$@"
