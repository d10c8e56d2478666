"""`vlp train`: start `vlp.pipeline.train` on every rank through the real `deepspeed` launcher."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

TRAIN_MODULE = "vlp.pipeline.train"
# Exit codes a restart would only repeat (vlp.pipeline.train.trainer.train): done, bad input,
# non-finite loss (the same batches again)
FINAL_EXIT_CODES = (0, 2, 3)
CPU_DEFAULT_RANKS = 2
HOSTFILE_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\d+)")


class Selection(NamedTuple):
    """This node's ranks as the launcher line chooses them."""

    env: list[str]  # an `env ...` prefix for the launcher, or nothing
    flags: list[str]  # launcher flags


def device_selection(nproc: int | None) -> Selection:
    """The launcher line's choice of this node's ranks: every visible GPU by default (an error
    to ask for more), 2 ranks on a CPU node."""
    import torch

    from vlp.pipeline.data.errors import UserError

    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if not torch.cuda.is_available():
        return Selection([], ["--num_accelerators", str(nproc or CPU_DEFAULT_RANKS)])
    visible = torch.cuda.device_count()
    if nproc is not None and nproc > visible:
        raise UserError(f"--nproc {nproc} but this node has {visible} visible GPU(s) "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return gpu_selection(nproc or visible, visible, os.environ.get("CUDA_VISIBLE_DEVICES"))


def gpu_selection(ranks: int, visible: int, visible_devices: str | None) -> Selection:
    """`ranks` of the `visible` GPUs that CUDA_VISIBLE_DEVICES (`visible_devices`) names.

    DeepSpeed's runner drops CUDA_VISIBLE_DEVICES and gives the ranks `--include` slots (or
    0..N-1 with `--num_accelerators`) as integer ids; without either flag it turns the variable
    into `--include`. GPU ordinals pass that way. UUIDs (GPU-..., MIG-...) do not parse as slots,
    so they travel past the launcher in VISIBLE_DEVICES_HANDOVER, which each rank restores
    (vlp.pipeline.distributed.adopt_handed_over_devices), and the launcher only counts ranks.
    """
    from vlp.pipeline.distributed import VISIBLE_DEVICES_HANDOVER

    ids = [i.strip() for i in (visible_devices or "").split(",") if i.strip()]
    if ids and not all(i.isdigit() for i in ids):
        handover = f"{VISIBLE_DEVICES_HANDOVER}={','.join(ids[:ranks])}"
        return Selection(["env", "-u", "CUDA_VISIBLE_DEVICES", handover],
                         ["--num_accelerators", str(ranks)])
    if ranks == visible:
        return Selection([], [])  # the runner takes every visible GPU, as --include
    if ids:
        return Selection([], ["--include", "localhost:" + ",".join(ids[:ranks])])
    return Selection([], ["--num_accelerators", str(ranks)])


def rendezvous_port(master_port: int | None, multi_node: bool) -> int:
    """The launcher's rendezvous port, said on stderr with where it came from: --master-port as
    given; else, on one node, a free port (a fixed default made a second job on the node die
    with EADDRINUSE); else one every node derives alike from the scheduler's job id."""
    from vlp.pipeline.distributed import free_port, job_master_port

    if master_port is not None:
        port, source = master_port, "--master-port"
    elif not multi_node:
        port, source = free_port(), "free port picked"
    else:
        port, source = job_master_port()
    print(f"rendezvous on port {port} ({source})", file=sys.stderr, flush=True)
    return port


def launcher_command(recipe: str | None, overrides: list[str], *, master_port: int,
                     nproc: int | None = None, hostfile: str | None = None,
                     master_addr: str | None = None, node_rank: int | None = None,
                     resume: str | None = None) -> list[str]:
    """The deepspeed launcher command line for one node (or, with a hostfile, for all nodes).

    The launcher (what the `deepspeed` script runs) is started with this interpreter, so the
    ranks run the same Python environment as `vlp` itself."""
    selection = Selection([], []) if hostfile else device_selection(nproc)
    cmd = [*selection.env, sys.executable, "-m", "deepspeed.launcher.runner",
           "--master_port", str(master_port), *selection.flags]
    if hostfile:
        cmd += ["--hostfile", hostfile]
        if master_addr:
            cmd += ["--master_addr", master_addr]
        if node_rank is not None:  # one launcher per node, no ssh (e.g. started by a scheduler)
            cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    cmd += ["--module", TRAIN_MODULE]
    if recipe:
        cmd += ["--recipe", recipe]
    if resume:
        cmd += ["--resume", resume]
    if overrides:
        cmd += ["--set", *overrides]
    return cmd


def run_training(recipe: str | None, overrides: list[str], master_port: int | None = None,
                 max_restarts: int = 0, run_dir: str | None = None, **launch) -> int:
    """Run the launcher to completion; returns its exit code. A launch that fails for another
    reason than FINAL_EXIT_CODES (a killed or hung rank, a lost node) is started again, at most
    `max_restarts` times, resuming from the newest valid checkpoint in `run_dir`."""
    code = launch_once(recipe, overrides, master_port, **launch)
    for restart in range(1, max_restarts + 1):
        if code in FINAL_EXIT_CODES:
            break
        launch = dict(launch, resume=restart_resume(run_dir, launch.get("resume")))
        print(f"vlp train: the launcher exited {code}; restart {restart} of {max_restarts} "
              f"(--resume {launch['resume']})", file=sys.stderr, flush=True)
        code = launch_once(recipe, overrides, master_port, **launch)
    return code


def restart_resume(run_dir: str | None, resume: str | None) -> str | None:
    """How a restart resumes: from the newest checkpoint that validates, once the run has one
    (a tag being written when the job died is never used); before that as first asked."""
    from vlp.pipeline.data.checkpoints import complete_tags

    if run_dir and complete_tags(Path(run_dir) / "checkpoints"):
        return "latest-valid"
    return resume


def launch_once(recipe: str | None, overrides: list[str], master_port: int | None = None,
                **launch) -> int:
    """Run the launcher to completion (`master_port`: see rendezvous_port); returns its exit
    code. Dead jobs' shared-memory buffers are removed first, and this job's when it ends."""
    from vlp.pipeline.distributed import remove_shm_buffers, remove_stale_shm_buffers

    stale = remove_stale_shm_buffers()
    if stale:
        print(f"removed {len(stale)} shared-memory buffer(s) left in /dev/shm by dead jobs",
              flush=True)
    port = rendezvous_port(master_port, multi_node=launch.get("hostfile") is not None)
    cmd = launcher_command(recipe, overrides, master_port=port, **launch)
    print("+ " + shlex.join(cmd), flush=True)
    try:
        return subprocess.call(cmd, env=os.environ.copy())
    finally:  # the buffers of ranks that died before their own cleanup
        remove_shm_buffers(port)


def hostfile_slots(path: str) -> dict[str, int]:
    """Host -> ranks from a DeepSpeed hostfile ('node-a slots=8' lines, '#' comments).

    Checked here because the launcher itself falls back to this node alone when the file is
    missing, and each node would then train as its own world."""
    from vlp.pipeline.data.errors import UserError

    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise UserError(f"--hostfile {path} {what}; expected a file of 'HOST slots=N' lines")
    slots: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.fullmatch(line)
        if not match or int(match["slots"]) < 1 or match["host"] in slots:
            raise UserError(f"--hostfile {path} line {number}: {line!r} is not 'HOST slots=N' "
                            "with N >= 1 and each host once")
        slots[match["host"]] = int(match["slots"])
    if not slots:
        raise UserError(f"--hostfile {path} lists no hosts; expected 'HOST slots=N' lines")
    return slots


def world_size(nproc: int | None, hostfile: str | None) -> int:
    """Ranks the launch will start: the hostfile's slots, else this node's (device_selection)."""
    if hostfile:
        return sum(hostfile_slots(hostfile).values())
    import torch

    if nproc is not None:
        return nproc
    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_DEFAULT_RANKS


def check_launch_flags(args) -> None:
    """Refuse flag combinations the launcher would silently ignore."""
    from vlp.pipeline.data.errors import UserError

    if not args.hostfile:
        given = [flag for flag, value in (("--master-addr", args.master_addr),
                                          ("--node-rank", args.node_rank)) if value is not None]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise UserError(f"{' and '.join(given)} {verb} --hostfile: without one the launcher "
                            "starts this node alone and each node would train as its own world")
    elif args.nproc is not None:
        raise UserError("--nproc applies without --hostfile only; with one, its 'slots=N' set "
                        "the ranks of each node")
    if args.node_rank is not None and not args.master_addr:
        raise UserError("--node-rank needs --master-addr (an address of node 0 every node reaches)")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {args.max_restarts}")


def print_keys() -> None:
    """Every config key with its type, default and docstring (`vlp train --list-keys`)."""
    from vlp.pipeline.train.config import list_keys

    for key, type_name, default, doc in list_keys():
        print(f"{key} ({type_name}, default {default!r})\n    {doc}")


def _cmd_train(args) -> int:
    if args.list_keys:
        print_keys()
        return 0
    from vlp.pipeline.train.trainer import check_run

    check_launch_flags(args)
    if not args.hostfile:
        device_selection(args.nproc)  # checks --nproc before the slower checks
    world = world_size(args.nproc, args.hostfile)
    resume = [f"checkpoint.resume={args.resume}"] if args.resume else []
    cfg = check_run(args.recipe, args.set + resume, world)
    launch = dict(nproc=args.nproc, hostfile=args.hostfile, master_addr=args.master_addr,
                  node_rank=args.node_rank, resume=args.resume)
    if args.dry_run:
        port = rendezvous_port(args.master_port, multi_node=args.hostfile is not None)
        print(f"config, tokenizer, shards and DeepSpeed config are valid for {world} ranks "
              f"(run_dir {cfg.run_dir}); the launch command:", file=sys.stderr)
        print(shlex.join(launcher_command(args.recipe, args.set, master_port=port, **launch)))
        return 0
    return run_training(args.recipe, args.set, master_port=args.master_port,
                        max_restarts=args.max_restarts, run_dir=cfg.run_dir, **launch)


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(
        subparsers, "train", "pretrain with DeepSpeed ZeRO-3 (real deepspeed launcher)",
        ["vlp train --recipe tiny_synth.yaml --set run_dir=runs/tiny optim.max_steps=200",
         "vlp train --recipe tiny_synth.yaml --dry-run   # validate everything, print the launch",
         "vlp train --list-keys                          # every config key with its doc"],
        description="Pretrain with DeepSpeed ZeRO-3 through the real deepspeed launcher. The "
                    "whole run (config keys and values, recipe, tokenizer, shards for the "
                    "number of ranks, DeepSpeed config, resume checkpoint, hostfile) is "
                    "validated here before any rank starts. Config keys: `vlp train "
                    "--list-keys`, or pipeline/train/config.py.")
    p.add_argument("--recipe", help="YAML training recipe: a file or a shipped name "
                                    "(tiny_synth.yaml, base_pretrain.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.max_steps=200 run_dir=runs/tiny "
                        "(keys: --list-keys)")
    p.add_argument("--resume", choices=["auto", "latest", "latest-valid", "none"],
                   help="shorthand for --set checkpoint.resume=MODE (default: the config's, auto)")
    p.add_argument("--nproc", type=int,
                   help="ranks on this node without a hostfile (default: every visible GPU; "
                        f"{CPU_DEFAULT_RANKS} on a CPU node)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines) for multi-node")
    p.add_argument("--master-addr", help="address of node 0, reachable from every node "
                                         "(with --hostfile)")
    p.add_argument("--master-port", type=int,
                   help="rendezvous port on node 0 (default: a free port on one node; with "
                        "--hostfile one derived from $SLURM_JOB_ID, else 29500)")
    p.add_argument("--node-rank", type=int,
                   help="start only this node's ranks, without ssh (run once per node; with "
                        "--hostfile and --master-addr)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="start the launcher again, at most N times, when it fails (a killed or "
                        "hung rank; not for bad input or a non-finite loss), resuming from the "
                        "newest valid checkpoint (default 0)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the whole run, print the launcher command and exit")
    p.add_argument("--list-keys", action="store_true",
                   help="print every config key with its type, default and doc, and exit")
    p.set_defaults(func=_cmd_train)
