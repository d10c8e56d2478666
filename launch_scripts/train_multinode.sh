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
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile}"
: "${MASTER_ADDR:?set MASTER_ADDR to an address of the first node}"
node_args=()
if [[ -n "${NODE_RANK:-}" ]]; then
  node_args=(--no_ssh --node_rank "$NODE_RANK")
fi
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" "${node_args[@]}" \
  pipeline/train.py --recipe "${RECIPE:-pipeline/recipes/tiny_synth.yaml}" --set "$@"
