"""The launch scripts (SLURM, multi-node, cron, shard preparation), shipped as package data so an
install without the checkout has them: `vlp scripts list|show|copy`."""
