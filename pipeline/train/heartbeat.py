"""Hangs: a heartbeat that names the stuck rank, and the collective timeout per phase of a run.

Every rank rewrites `run_dir/heartbeat/rank_{R}.json` every `heartbeat_every_s` seconds from a
daemon thread:

    {"rank": 3, "host": "node-b", "pid": 4121, "step": 1234, "phase": "data",
     "since": 1767225600.0, "limit_s": 300, "written": 1767225641.5}

`step` and `phase` are where the training loop is (start, data: waiting for a batch, compute:
forward/backward/update and their collectives, checkpoint) and `since` when it got there. The
thread keeps writing while the loop is stuck in a collective, the loader or the file system, so
the files tell two hangs apart (`stuck_ranks`): a rank whose file is no longer written is gone or
frozen; a rank that has been in one step and phase for more than half its collective timeout is
stuck there (a rank in `data` while the others are in `compute` is the one they wait for). Rank
0's thread also reads every rank's file and prints each finding once, before the timeout ends
the job.

The collective timeout (`HangGuard`) is `dist_timeout_s` from start-up until the first step of a
launch is done (process-group set-up, checkpoint loading, ZeRO-3's first steps) and while a
checkpoint is saved (rank 0 publishes and prunes while the others wait), and `step_timeout_s`
otherwise, as torchtitan shortens it after its first step: a hang then ends the job in minutes,
and `vlp train --max-restarts` resumes it from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlp.pipeline.data.files import write_json_atomic

MISSED_BEATS = 3  # a file this many intervals old (plus a second) is a rank that stopped writing


class Heartbeat:
    """This rank's heartbeat file, written from a daemon thread; rank 0's thread also watches."""

    def __init__(self, directory: Path, rank: int, world: int, every_s: float, watch: bool):
        self.directory, self.rank, self.world = Path(directory), rank, world
        self.every_s, self.watch = every_s, watch
        self.started = time.time()
        self.state = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                      "step": 0, "phase": "start", "since": self.started, "limit_s": 0}
        self.reported: set[tuple] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlp-heartbeat", daemon=True)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()

    def enter(self, step: int, phase: str, limit_s: float) -> None:
        """The loop is now in `phase` of `step`, under a collective timeout of `limit_s`."""
        self.state = {**self.state, "step": step, "phase": phase, "since": time.time(),
                      "limit_s": limit_s}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write()
            if self.watch:
                self._report()

    def _write(self) -> None:
        try:
            write_json_atomic(self.directory / f"rank_{self.rank}.json",
                              {**self.state, "written": time.time()})
        except OSError as exc:  # a full or vanished file system must not stop training
            print(f"heartbeat: cannot write {self.directory}: {exc}", file=sys.stderr, flush=True)

    def _report(self) -> None:
        beats = read_beats(self.directory, self.world, since=self.started)
        for key, line in stuck_ranks(beats, time.time(), self.every_s):
            if key not in self.reported:
                self.reported.add(key)
                print(f"watchdog: {line}", file=sys.stderr, flush=True)


def read_beats(directory: Path, world: int, since: float = 0.0) -> list[dict]:
    """The heartbeats of ranks 0..world-1 written after `since` (earlier launches' are ignored)."""
    beats = []
    for rank in range(world):
        try:
            beat = json.loads((Path(directory) / f"rank_{rank}.json").read_text())
        except (OSError, ValueError):  # not started yet, or being replaced
            continue
        if beat.get("written", 0) >= since:
            beats.append(beat)
    return beats


def stuck_ranks(beats: list[dict], now: float, every_s: float) -> list[tuple[tuple, str]]:
    """(key, finding) for each rank that stopped writing or has been in one phase for more than
    half its collective timeout; the key is the same for the same finding."""
    found = []
    for beat in beats:
        who = f"rank {beat['rank']} ({beat['host']}, pid {beat['pid']})"
        where = f"step {beat['step']} ({beat['phase']})"
        silent, stayed = now - beat["written"], now - beat["since"]
        if silent > MISSED_BEATS * every_s + 1:
            found.append(((beat["rank"], "silent", beat["step"], beat["phase"]),
                          f"{who} has written no heartbeat for {silent:.0f} s, last in {where}: "
                          "the process is gone or frozen"))
        elif beat["limit_s"] and stayed > beat["limit_s"] / 2:
            found.append(((beat["rank"], "stuck", beat["step"], beat["phase"]),
                          f"{who} has been in {where} for {stayed:.0f} s (collective timeout "
                          f"{beat['limit_s']:.0f} s)"))
    return found


class HangGuard:
    """The heartbeat and the collective timeout of each phase of a launch (module docstring)."""

    def __init__(self, run_dir: Path, rank: int, world: int, start_timeout_s: int,
                 step_timeout_s: int | None, every_s: float):
        self.start_timeout_s = start_timeout_s
        self.step_timeout_s = step_timeout_s or start_timeout_s
        self.steady, self.current = False, 0
        self.heartbeat = (Heartbeat(Path(run_dir) / "heartbeat", rank, world, every_s,
                                    watch=rank == 0) if every_s else None)
        if self.heartbeat is not None:
            self.heartbeat.enter(0, "start", start_timeout_s)
            self.heartbeat.start()

    def batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        """`batches`, the wait for each one marked as the current step's data phase."""
        batches = iter(batches)
        while True:
            self._enter("data")
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._enter("compute")
            yield batch

    @contextmanager
    def step(self, step: int):
        """One training step; after the first, collectives get the step timeout."""
        self.current = step
        self._enter("compute")
        yield
        if not self.steady:
            self._set_timeout(self.step_timeout_s)
            self.steady = True

    @contextmanager
    def slow(self, phase: str):
        """A phase that may wait long on another rank (a checkpoint save): the start-up timeout."""
        self._set_timeout(self.start_timeout_s)
        self._enter(phase, self.start_timeout_s)
        try:
            yield
        finally:
            self._set_timeout(self._timeout())

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def _timeout(self) -> int:
        return self.step_timeout_s if self.steady else self.start_timeout_s

    def _enter(self, phase: str, limit_s: int | None = None) -> None:
        if self.heartbeat is not None:
            self.heartbeat.enter(self.current, phase, limit_s or self._timeout())

    def _set_timeout(self, seconds: int) -> None:
        from vlp.pipeline.distributed import set_collective_timeout

        if self.step_timeout_s != self.start_timeout_s:
            set_collective_timeout(seconds)
