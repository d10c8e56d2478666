"""`vlp train`: start `vlp.pipeline.train` on every rank through the real `deepspeed` launcher."""
from __future__ import annotations

import os
import subprocess
import sys

TRAIN_MODULE = "vlp.pipeline.train"
CPU_DEFAULT_RANKS = 2


def device_selection(nproc: int | None) -> list[str]:
    """Launcher flags choosing this node's ranks.

    On a GPU node the ranks default to every visible GPU, and CUDA_VISIBLE_DEVICES is respected:
    the launcher would otherwise drop it and use GPUs 0..N-1 (`--num_accelerators`), so a subset
    is passed as `--include localhost:<ids>` instead. Asking for more ranks than visible GPUs is
    an error. On a CPU node the default is 2 ranks.
    """
    import torch

    from vlp.pipeline.data.errors import UserError

    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if not torch.cuda.is_available():
        return ["--num_accelerators", str(nproc or CPU_DEFAULT_RANKS)]
    visible = torch.cuda.device_count()
    if nproc is not None and nproc > visible:
        raise UserError(f"--nproc {nproc} but this node has {visible} visible GPU(s) "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    ids = [i for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip()]
    if nproc is None or nproc == visible:
        return []  # the launcher takes every visible GPU, honouring CUDA_VISIBLE_DEVICES
    if ids:
        return ["--include", "localhost:" + ",".join(ids[:nproc])]
    return ["--num_accelerators", str(nproc)]


def launcher_command(recipe: str | None, overrides: list[str], nproc: int | None = None,
                     hostfile: str | None = None, master_addr: str | None = None,
                     master_port: int = 29500, node_rank: int | None = None,
                     resume: str | None = None) -> list[str]:
    """The deepspeed launcher command line for one node (or, with a hostfile, for all nodes).

    The launcher (what the `deepspeed` script runs) is started with this interpreter, so the
    ranks run the same Python environment as `vlp` itself."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(master_port)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
        if master_addr:
            cmd += ["--master_addr", master_addr]
        if node_rank is not None:  # one launcher per node, no ssh (e.g. started by a scheduler)
            cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    else:
        cmd += device_selection(nproc)
    cmd += ["--module", TRAIN_MODULE]
    if recipe:
        cmd += ["--recipe", recipe]
    if resume:
        cmd += ["--resume", resume]
    if overrides:
        cmd += ["--set", *overrides]
    return cmd


def run_training(recipe: str | None, overrides: list[str], **launch) -> int:
    """Run the launcher to completion; returns its exit code. Dead jobs' shared-memory buffers
    are removed first, and this job's when it ends."""
    from vlp.pipeline.distributed import remove_shm_buffers, remove_stale_shm_buffers

    stale = remove_stale_shm_buffers()
    if stale:
        print(f"removed {len(stale)} shared-memory buffer(s) left in /dev/shm by dead jobs",
              flush=True)
    cmd = launcher_command(recipe, overrides, **launch)
    print("+ " + " ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd, env=os.environ.copy())
    finally:  # the buffers of ranks that died before their own cleanup
        remove_shm_buffers(launch.get("master_port", 29500))


def _cmd_train(args) -> int:
    launch = dict(nproc=args.nproc, hostfile=args.hostfile, master_addr=args.master_addr,
                  master_port=args.master_port, node_rank=args.node_rank, resume=args.resume)
    if args.dry_run:
        print(" ".join(launcher_command(args.recipe, args.set, **launch)))
        return 0
    return run_training(args.recipe, args.set, **launch)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain with DeepSpeed ZeRO-3 (real deepspeed launcher)")
    p.add_argument("--recipe", help="YAML training recipe (shipped: vlp/pipeline/recipes/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.max_steps=200 run_dir=runs/tiny")
    p.add_argument("--resume", choices=["auto", "latest", "latest-valid", "none"])
    p.add_argument("--nproc", type=int,
                   help="ranks on this node without a hostfile (default: every visible GPU; "
                        f"{CPU_DEFAULT_RANKS} on a CPU node)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines) for multi-node")
    p.add_argument("--master-addr", help="address of node 0, reachable from every node")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--node-rank", type=int,
                   help="start only this node's ranks, without ssh (run once per node)")
    p.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")
    p.set_defaults(func=_cmd_train)
