#!/usr/bin/env bash
# One node through the real deepspeed launcher (`vlp train`): one rank per visible GPU
# (CUDA_VISIBLE_DEVICES is respected), or NPROC ranks.
#   NPROC=8 RECIPE=base_pretrain.yaml bash launch_scripts/train_local.sh run_dir=runs/x
# RECIPE is a file or a shipped recipe name (default tiny_synth.yaml). Extra arguments are config
# overrides (section.key=value). DRY_RUN=1 validates the whole run and prints the launch command.
set -euo pipefail
nproc_args=()
[[ -n "${NPROC:-}" ]] && nproc_args=(--nproc "$NPROC")
[[ -n "${DRY_RUN:-}" ]] && nproc_args+=(--dry-run)
exec vlp train --recipe "${RECIPE:-tiny_synth.yaml}" "${nproc_args[@]}" \
  --master-port "${MASTER_PORT:-29500}" --set "$@"
