"""Progress of an img2dataset run: its shards counted as they finish, with an ETA.

img2dataset writes `{shard}_stats.json` beside a shard when the shard is done; a thread counts
those files every few seconds and feeds a ProgressLine (pipeline/progress.py), so a log file gets
whole `download: 7/12 (58%) | 0.4 shards/s | elapsed 18s | ETA 13s` lines. Shards an earlier,
resumed run already finished are not counted.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

import pyarrow.parquet as pq

from vlp.data_prep.folder import Folder
from vlp.pipeline.progress import ProgressLine

POLL_S = 5.0


def expected_shards(parts: list[Path], per_shard: int) -> int:
    """img2dataset's shard count: each input part is cut into shards of `per_shard` rows."""
    return sum(math.ceil(pq.ParquetFile(part).metadata.num_rows / per_shard) for part in parts)


def finished_shards(out: Folder) -> int:
    return sum(name.endswith("_stats.json") for name in out.names())


class ShardProgress:
    """Context manager: while img2dataset writes into `out`, report its finished shards."""

    def __init__(self, out: Folder, total: int, poll_s: float = POLL_S):
        self.out, self.poll_s = out, poll_s
        self.before = finished_shards(out)
        self.line = ProgressLine("download", max(0, total - self.before), "shard")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="download-progress", daemon=True)

    def _count(self) -> None:
        self.line.update(finished_shards(self.out) - self.before - self.line.done)

    def _watch(self) -> None:
        while not self.stop.wait(self.poll_s):
            self._count()

    def __enter__(self) -> ShardProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._count()
        self.line.close()
