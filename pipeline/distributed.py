"""Process-group setup from the environment that deepspeed, torchrun or srun set."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

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


def shutdown_distributed() -> None:
    """Destroy the process group and remove this rank's DeepSpeed shared-memory buffer.

    On the CPU accelerator DeepSpeed backs intra-node allreduce with one /dev/shm file per rank
    (69 MB) and never unlinks it, so every run used to leave its files in memory until reboot.
    Unlinking at exit is safe: the other ranks' mappings stay valid.
    """
    if not torch.distributed.is_initialized():
        return
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()
    remove_shm_buffers(os.environ.get("MASTER_PORT", "29500"), rank)


def remove_shm_buffers(master_port: int | str, rank: int | str = "*") -> None:
    """Unlink DeepSpeed's CPU allreduce buffers of the job on `master_port` (one rank or all),
    e.g. after its launcher exits, which also covers ranks that were killed."""
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_{rank}"
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)
