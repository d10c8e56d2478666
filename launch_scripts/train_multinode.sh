#!/usr/bin/env bash
# Several nodes through the deepspeed launcher.
#
# Hostfile (one line per node, slots = ranks on that node):
#     node-a slots=8
#     node-b slots=8
#
# Mode 1, ssh (default): run once on node-a; the launcher reaches the other nodes with
# passwordless ssh (pdsh). MASTER_ADDR must be an address of node-a that every node can reach.
# Environment variables the remote ranks need (NCCL_SOCKET_IFNAME, PYTHONPATH, ...) go in a
# `.deepspeed_env` file (KEY=VALUE lines) in the working directory or $HOME: the launcher exports
# them on every node.
#     HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash launch_scripts/train_multinode.sh run_dir=runs/x
#
# Mode 2, no ssh: run once per node, each with its NODE_RANK (0 on node-a, 1 on node-b, ...),
# e.g. from a scheduler that starts one task per node:
#     NODE_RANK=1 HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash launch_scripts/train_multinode.sh ...
#
# Extra arguments are config overrides (section.key=value). The shards and run_dir must be on
# storage every node sees (checkpoints are written by every rank into run_dir/checkpoints).
# RECIPE is a file or a shipped recipe name (default base_pretrain.yaml). DRY_RUN=1 validates the
# whole run on this node (config, tokenizer, shards for the hostfile's ranks) and prints the
# launch command. MASTER_PORT sets the rendezvous port; by default every node derives the same one
# from $SLURM_JOB_ID (29500 outside SLURM).
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile}"
: "${MASTER_ADDR:?set MASTER_ADDR to an address of the first node}"
node_args=()
if [[ -n "${NODE_RANK:-}" ]]; then
  node_args=(--node-rank "$NODE_RANK")
fi
[[ -n "${MASTER_PORT:-}" ]] && node_args+=(--master-port "$MASTER_PORT")
[[ -n "${DRY_RUN:-}" ]] && node_args+=(--dry-run)
exec vlp train --recipe "${RECIPE:-base_pretrain.yaml}" --hostfile "$HOSTFILE" \
  --master-addr "$MASTER_ADDR" "${node_args[@]}" --set "$@"
