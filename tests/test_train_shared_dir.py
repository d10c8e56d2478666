"""Ranks that do not share run_dir stop at start-up with one error instead of hanging later.

Two real ranks (gloo on loopback) call the check; this machine has one filesystem, so nodes with
their own disks are played by giving the ranks different directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from train_helpers import REPO

from vlp.pipeline.distributed import free_port

RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from vlp.pipeline.data.errors import UserError
    from vlp.pipeline.train.shared_dir import check_shared_run_dir

    dist.init_process_group("gloo")
    try:
        check_shared_run_dir(sys.argv[1])
        outcome = "ok"
    except UserError as exc:
        outcome = str(exc)
    dist.destroy_process_group()
    print(json.dumps(outcome))
""")


def run_two_ranks(dir0, dir1) -> list[str]:
    """Each rank's outcome: "ok" or its error message."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(run_dir)], cwd=REPO,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, run_dir in enumerate((dir0, dir1))]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outcomes.append(json.loads(out.splitlines()[-1]))
    return outcomes


def test_ranks_sharing_run_dir_pass_and_leave_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    assert run_two_ranks(run_dir, run_dir) == ["ok", "ok"]
    assert list(run_dir.iterdir()) == []


def test_a_rank_with_its_own_run_dir_stops_every_rank_with_one_error(tmp_path):
    """Both ranks raise the same error (each naming run_dir as it sees it); rank 0 prints it."""
    dirs = [tmp_path / "node0/run", tmp_path / "node1/run"]
    outcomes = run_two_ranks(*dirs)
    assert outcomes[0].replace(str(dirs[0]), "RUN") == outcomes[1].replace(str(dirs[1]), "RUN")
    assert outcomes[0].startswith(f"run_dir {dirs[0]} is not one directory for all ranks: "
                                  "rank(s) 1 (host ")
    assert "filesystem every node mounts" in outcomes[0]
