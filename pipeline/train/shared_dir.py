"""One run directory for every rank: checked at start-up, before any rank reads a checkpoint.

On disks local to each node the ranks would each see their own `run_dir`: they disagree about
which checkpoint exists, one rank loads a tag while another starts afresh, and both wait in a
collective until the distributed timeout. Instead: rank 0 writes a file of a fresh name into
run_dir, every rank looks for it once rank 0 has written it, and if any rank does not see it
every rank stops with the same error.
"""
from __future__ import annotations

import socket
import uuid
from pathlib import Path

import torch.distributed as dist

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import write_text_atomic

TOKEN_PREFIX = ".shared_dir_check_"


def check_shared_run_dir(run_dir: Path) -> None:
    """UserError on every rank, naming the ranks and hosts that do not see the file rank 0
    wrote into `run_dir` (a collective: every rank calls it)."""
    run_dir = Path(run_dir)
    rank = dist.get_rank()
    token = [uuid.uuid4().hex if rank == 0 else None]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / f"{TOKEN_PREFIX}{token[0]}", token[0])
    dist.broadcast_object_list(token, src=0)  # after rank 0's write: every rank waits for it
    path = run_dir / f"{TOKEN_PREFIX}{token[0]}"  # a new name per run: no stale cached entry
    try:
        seen = path.read_text(encoding="utf-8") == token[0]
    except OSError:
        seen = False
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), seen))
    if rank == 0:
        path.unlink(missing_ok=True)
    blind = [f"{r} (host {host})" for r, (host, ok) in enumerate(views) if not ok]
    if blind:
        raise UserError(
            f"run_dir {run_dir} is not one directory for all ranks: rank(s) {', '.join(blind)} "
            f"do not see the file rank 0 (host {views[0][0]}) wrote there. Put run_dir on a "
            "filesystem every node mounts (NFS, Lustre, ...), so that the ranks agree on which "
            "checkpoints exist")
