"""Hangs and dead ranks at scale: `vlp train --max-restarts` relaunches a failed job from its last
checkpoint, and the heartbeat names a rank that stopped or got stuck."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from fault_helpers import rank_process
from train_helpers import REPO, metrics_by_step, train_overrides, wait_for

from vlp.pipeline.train.heartbeat import Heartbeat, read_beats, stuck_ranks


@contextlib.contextmanager
def training_with_restarts(overrides: list[str], log, restarts: int):
    """`vlp train --max-restarts RESTARTS` in its own session, its output in `log`; killed with
    its process group if the test leaves before it ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlp.pipeline.cli", "train", "--max-restarts", str(restarts),
             "--set", *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                         "PYTHONUNBUFFERED": "1"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rank_1_starts_step_5(run_dir, proc, times: int):
    """Wait until rank 1 has started step 5 `times` times (once per launch that got there);
    returns that rank's process."""
    keys = run_dir / "samples/rank1.jsonl"

    def started() -> int:
        lines = keys.read_text().splitlines() if keys.exists() else []
        return sum('"step": 5,' in line and '"micro": 0' in line for line in lines)

    wait_for(lambda: started() >= times, 180, f"rank 1 starting step 5 ({times})", proc)
    return rank_process(proc.pid, 1)


@pytest.mark.slow
def test_a_killed_rank_then_a_frozen_one_are_restarted_and_the_run_finishes(
        shard_dir, tokenizer_dir, tmp_path):
    """One `vlp train --max-restarts 2` run (6 steps, checkpoints at 3 and 6), two faults:
    1. SIGKILL rank 1 as it starts step 5: the launcher fails, `vlp train` starts it again with
       --resume latest-valid, and the run resumes at step 3;
    2. SIGSTOP the new rank 1 as it starts step 5 again: rank 0's watchdog names it, rank 0's
       next collective times out after step_timeout_s (not dist_timeout_s), and the second
       restart resumes at step 3 and finishes with exit 0. Once the launcher is killing the
       frozen rank, the test lets it run, so that its pending SIGTERM ends it at once
       (DeepSpeed would wait 30 s before SIGKILL)."""
    run_dir = tmp_path / "run"
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir, "step_timeout_s=8",
                                "heartbeat_every_s=1", "dist_timeout_s=600")
    log = tmp_path / "vlp_train.txt"
    with training_with_restarts(overrides, log, restarts=2) as proc:
        rank_1_starts_step_5(run_dir, proc, times=1).kill()
        wait_for(lambda: "restart 1 of 2" in log.read_text(), 120, "the first restart", proc)
        frozen = rank_1_starts_step_5(run_dir, proc, times=2)
        frozen.suspend()
        stopped = time.monotonic()
        wait_for(lambda: f"Killing subprocess {frozen.pid}" in log.read_text(), 120,
                 "the launcher killing the frozen rank 1", proc)
        frozen.resume()
        wait_for(lambda: "restart 2 of 2" in log.read_text(), 120, "the second restart", proc)
        ended = time.monotonic() - stopped
        rc = proc.wait(timeout=180)
    text = log.read_text()
    print(f"frozen rank 1: the launch ended {ended:.0f} s later")
    assert rc == 0, text[-4000:]
    assert "restart 1 of 2 (--resume latest-valid)" in text
    assert f"rank 1 ({socket.gethostname()}, pid {frozen.pid}) has written no heartbeat" in text
    assert ended < 600
    assert text.count("global_step3 at step 3") == 2  # each restart resumed before the faults
    assert json.loads((run_dir / "train_summary.json").read_text())["step"] == 6
    assert sorted(metrics_by_step(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints/latest").read_text() == "global_step6"


def test_the_heartbeat_names_a_frozen_rank_and_a_stuck_one(tmp_path):
    """Three ranks writing every 0.1 s: rank 1 stops (a frozen process), rank 2 has been in the
    data phase of step 7 for 200 s under a 300 s timeout (the one the others wait for)."""
    beats = []
    for rank in range(3):
        heartbeat = Heartbeat(tmp_path, rank, world=3, every_s=0.1, watch=False)
        heartbeat.enter(7, "data" if rank == 2 else "compute", limit_s=300)
        heartbeat.start()
        beats.append(heartbeat)
    wait_for(lambda: len(read_beats(tmp_path, 3)) == 3, 10, "three heartbeats")
    beats[1].stop()
    beats[2].state["since"] -= 200
    time.sleep(2)  # rank 1 misses more than 3 beats + 1 s
    found = dict(stuck_ranks(read_beats(tmp_path, 3), time.time(), every_s=0.1))
    for heartbeat in (beats[0], beats[2]):
        heartbeat.stop()
    assert sorted(key[:2] for key in found) == [(1, "silent"), (2, "stuck")]
    silent = found[(1, "silent", 7, "compute")]
    assert silent.startswith(f"rank 1 ({socket.gethostname()}, pid {os.getpid()}) has written "
                             "no heartbeat for 2 s, last in step 7 (compute)")
    assert silent.endswith("the process is gone or frozen")
    assert re.search(r"^rank 2 \(.*\) has been in step 7 \(data\) for 20\d s \(collective "
                     r"timeout 300 s\)$", found[(2, "stuck", 7, "data")])
