"""Process-group setup from the environment that deepspeed, torchrun or srun set."""
from __future__ import annotations

import os
from datetime import timedelta

import torch


def env_from_slurm() -> None:
    """Map srun's SLURM_* variables to RANK/WORLD_SIZE/LOCAL_RANK when a launcher did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("running under srun without MASTER_ADDR: export it in the sbatch script "
                           "(see launch_scripts/train_slurm.sbatch)")


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); (rank, world)."""
    import deepspeed

    env_from_slurm()
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                          ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(name, default)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    if not torch.cuda.is_available():
        # Share the cores between the ranks of this node instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "0")) or 0)
        local_world = local_world or max(1, torch.distributed.get_world_size())
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, os.cpu_count() // local_world)
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
