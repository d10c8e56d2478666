"""Process-group setup from the environment that deepspeed, torchrun or srun set."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch


DEFAULT_MASTER_PORT = 29500
# Ports derived from a job id stay below Linux's ephemeral range (32768+), where the kernel picks
# free_port()'s ports and those of outgoing connections.
JOB_PORTS = range(20000, 30000)
# GPU UUIDs (GPU-..., MIG-...) that `vlp train` hands to its ranks past the deepspeed launcher,
# which accepts only integer device ids (vlp.pipeline.train.launch.gpu_selection)
VISIBLE_DEVICES_HANDOVER = "VLP_CUDA_VISIBLE_DEVICES"


def free_port() -> int:
    """A loopback port that was free a moment ago (for a server or rendezvous started later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_master_port() -> tuple[int, str]:
    """The rendezvous port every node of a job derives alike, and where it came from: one per
    $SLURM_JOB_ID (so two jobs sharing a node differ), else DEFAULT_MASTER_PORT."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        return DEFAULT_MASTER_PORT, "default: no SLURM_JOB_ID"
    return JOB_PORTS[int(job) % len(JOB_PORTS)], "from SLURM_JOB_ID"


def env_from_slurm() -> None:
    """Map srun's SLURM_* variables to RANK/WORLD_SIZE/LOCAL_RANK when a launcher did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", str(job_master_port()[0]))
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("running under srun without MASTER_ADDR: export it in the sbatch script "
                           "(see launch_scripts/train_slurm.sbatch)")


def adopt_handed_over_devices() -> None:
    """Make the GPUs `vlp train` handed over by UUID this process's CUDA_VISIBLE_DEVICES (the
    launcher set it to integer ids). CUDA reads the variable once, at its first use in the
    process: this runs before anything asks torch or DeepSpeed about devices."""
    handed = os.environ.pop(VISIBLE_DEVICES_HANDOVER, None)
    if handed:
        os.environ["CUDA_VISIBLE_DEVICES"] = handed


def local_device() -> torch.device:
    """This rank's device: its GPU, else the CPU.

    The CUDA ordinal is LOCAL_RANK when the rank sees all of the node's GPUs (deepspeed,
    torchrun), and 0 when it sees exactly one (SLURM's --gpus-per-task / --gpu-bind, or a
    launcher that sets CUDA_VISIBLE_DEVICES per rank).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {visible} GPU(s) are visible "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           "start at most one rank per visible GPU")
    return torch.device("cuda", local_rank)


# bf16 tensor cores arrived with Ampere (compute capability 8.0). torch.cuda.is_bf16_supported()
# also accepts older GPUs, which emulate bf16 far slower than their fp16 (ds_configs/*_fp16.json).
NATIVE_BF16_CAPABILITY = (8, 0)


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls are fast on `device`: GPUs of compute capability 8.0 or later, and
    CPUs with native bf16 (AVX512-BF16 or AMX, through oneDNN). Elsewhere bf16 is emulated (a
    generic CPU kernel about 60x slower than fp32: 0.6 vs 38 GFLOP/s on one AVX2 core), so bf16
    settings are treated as fp32 there."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY
    if device.type != "cpu":
        return True
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch build without the oneDNN check
        return False


def init_distributed(timeout_s: int, backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed; (rank, world size, this rank's device).

    `backend` defaults to nccl on CUDA and gloo on CPU; strings such as "cpu:gloo,cuda:nccl" pick
    one per device type (NCCL serves only CUDA tensors, so every collective of the training step
    runs on the device).
    """
    adopt_handed_over_devices()  # before `import deepspeed`, which asks CUDA for its devices
    import deepspeed

    env_from_slurm()
    port = str(job_master_port()[0])
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                          ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port)):
        os.environ.setdefault(name, default)
    device = local_device()
    if device.type == "cuda":
        # A collective that fails or times out aborts the communicator and ends this process,
        # so a hung rank ends the job (and a restart resumes it) instead of holding every GPU.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(device)  # before the group: NCCL binds to the current device
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cpu":
        # Share the cores between the ranks of this node instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "0")) or 0)
        local_world = local_world or max(1, torch.distributed.get_world_size())
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, os.cpu_count() // local_world)
        torch.set_num_threads(threads)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def set_collective_timeout(seconds: int) -> None:
    """The timeout of every later collective of the default group (NCCL and gloo), as
    torchtitan shortens it after its first step (torch's _set_pg_timeout)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=seconds))


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
    remove_shm_buffers(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT), rank)


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def remove_shm_buffers(master_port: int | str, rank: int | str = "*") -> None:
    """Unlink DeepSpeed's CPU allreduce buffers of the job on `master_port` (one rank or all),
    e.g. after its launcher exits, which also covers ranks that were killed."""
    for path in SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{master_port}_{rank}"):
        path.unlink(missing_ok=True)


def remove_stale_shm_buffers() -> list[Path]:
    """Unlink this user's DeepSpeed allreduce buffers that no process maps or holds open: those
    of jobs that died before any cleanup (a SIGKILLed launcher), which would otherwise fill
    /dev/shm run after run on a reused machine. Returns what was removed. A live job keeps its
    buffers: DeepSpeed holds each one open and mapped from its creation on."""
    ours = list(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"))
    if not ours:
        return []
    in_use = _shm_files_in_use()
    stale = [path for path in ours if str(path) not in in_use]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _shm_files_in_use() -> set[str]:
    """DeepSpeed shm buffer paths that a process (of those /proc lets us see) maps or has open."""
    used = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if SHM_PREFIX in line:
                    used.add(line.split(maxsplit=5)[5].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if SHM_PREFIX in target:
                    used.add(target)
        except OSError:  # the process ended, or is another user's
            continue
    return used
