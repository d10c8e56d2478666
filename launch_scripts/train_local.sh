#!/usr/bin/env bash
# One node through the real deepspeed launcher (`vlp train`): one rank per visible GPU
# (CUDA_VISIBLE_DEVICES is respected), or NPROC ranks.
#   NPROC=8 RECIPE=base_pretrain.yaml bash launch_scripts/train_local.sh run_dir=runs/x
# RECIPE is a file or a shipped recipe name (default tiny_synth.yaml). Extra arguments are config
# overrides (section.key=value). DRY_RUN=1 validates the whole run and prints the launch command.
# MASTER_PORT sets the rendezvous port; by default a free one is picked (two jobs share a node).
set -euo pipefail
launch_args=()
[[ -n "${NPROC:-}" ]] && launch_args=(--nproc "$NPROC")
[[ -n "${MASTER_PORT:-}" ]] && launch_args+=(--master-port "$MASTER_PORT")
[[ -n "${DRY_RUN:-}" ]] && launch_args+=(--dry-run)
exec vlp train --recipe "${RECIPE:-tiny_synth.yaml}" "${launch_args[@]}" --set "$@"
