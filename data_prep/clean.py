"""Sanitise and de-duplicate the parts of a URL list in worker processes, in bounded memory.

Each part is streamed in row batches (data_prep.url_lists), checked (data_prep.urls.check_batch)
and written as a cleaned parquet part that img2dataset reads as a folder. A URL is a duplicate
when its 64-bit hash was seen before: within a part, against the sorted hashes of the part so
far; across parts, by sorting: each part leaves its sorted hashes on disk, the driver walks the
hash space in ranges of about MERGE_ROWS hashes (every part's slice found by binary search in
a memory map), and a hash held by an earlier part is removed from the later ones, whose cleaned
parts are rewritten. Memory is bounded by the largest part (8 bytes a distinct URL) and by
MERGE_ROWS, not by the number of rows; the first occurrence in part order is kept, so the
result does not depend on how many workers ran. (Two URLs sharing a 64-bit hash would be taken
for one: among 400M distinct URLs the chance that any pair does is about 0.4%.)

Refused rows are counted per reason; up to REFUSED_SAMPLE of each reason and part are written
to REFUSED_DIR/part-NNNNN.parquet beside the shards, the counts to REFUSED_DIR/refused_urls.json.
Parts run in a local process pool, or as Spark tasks with the pyspark distributor (the work
folder must then be on a filesystem the executors share).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlp.data_prep.url_lists import BATCH_ROWS, Columns, iter_batches
from vlp.data_prep.urls import CODE, DNS_THREADS, REASONS, check_batch
from vlp.data_prep.workers import run_tasks
from vlp.pipeline.data.files import atomic_path, write_json_atomic

WORK_DIR = "_vlp_urls"
REFUSED_DIR = "refused"
REFUSED_SAMPLE = 100
MERGE_ROWS = 1 << 20
# URLs and captions are nearly all distinct: a dictionary would be built only to be dropped.
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "lz4"}
EXAMPLES_PER_KIND = 3


@dataclass(frozen=True)
class PartTask:
    """One part to clean: where it is, where its results go."""

    index: int
    source: Path
    columns: Columns
    work_dir: Path
    refused_dir: Path
    allow_private_hosts: bool
    image_root: str | None = None

    @property
    def cleaned(self) -> Path:
        return self.work_dir / "parts" / f"part-{self.index:05d}.parquet"

    @property
    def hashes(self) -> Path:
        return self.work_dir / "hashes" / f"part-{self.index:05d}.npy"


def url_hashes(urls: pa.Array) -> np.ndarray:
    """64-bit hashes of URL texts (pandas' SipHash, stable across processes and machines)."""
    return pd.util.hash_array(urls.to_numpy(zero_copy_only=False), categorize=False)


def mark_repeats(hashes: np.ndarray, codes: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Mark the kept rows whose URL hash is in `seen` (sorted) or earlier in the batch as
    duplicate_url; return `seen` with the new hashes, still sorted."""
    rows = np.flatnonzero(codes == 0)
    batch = hashes[rows]
    order = np.argsort(batch, kind="stable")  # equal hashes keep their row order
    ranked = batch[order]
    repeat = np.zeros(len(rows), bool)
    repeat[order[1:]] = ranked[1:] == ranked[:-1]
    at = np.searchsorted(seen, ranked)
    repeat[order] |= seen[np.minimum(at, len(seen) - 1)] == ranked if len(seen) else False
    codes[rows[repeat]] = CODE["duplicate_url"]
    new = ranked[~repeat[order]]
    return np.insert(seen, np.searchsorted(seen, new), new)


def _refused_sample(raw: pa.RecordBatch, codes: np.ndarray,
                    room: Counter) -> pa.Table | None:
    """Up to `room[reason]` refused rows of each reason (url, caption as text, reason)."""
    rows = []
    for code in np.unique(codes[codes > 0]):
        reason = REASONS[code - 1]
        picked = np.flatnonzero(codes == code)[:max(0, REFUSED_SAMPLE - room[reason])]
        room[reason] += len(picked)
        rows += [(i, reason) for i in picked]
    if not rows:
        return None
    index = [i for i, _ in rows]
    texts = [[_text(v) for v in raw.column(c).take(index).to_pylist()] for c in (0, 1)]
    return pa.table({"url": texts[0], "caption": texts[1], "reason": [r for _, r in rows]},
                    schema=pa.schema([("url", pa.string()), ("caption", pa.string()),
                                      ("reason", pa.string())]))


def _text(value) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def clean_part(task: PartTask) -> dict:
    """Sanitise one part into `task.cleaned` (no file when no row is kept); leave its sorted URL
    hashes in `task.hashes`; return its counts and examples of refused rows."""
    counts, sampled, seen = Counter(), Counter(), np.empty(0, np.uint64)
    refused = []
    with ThreadPoolExecutor(DNS_THREADS) as pool, _part_writer(task.cleaned) as writer:
        for raw in iter_batches(task.source, task.columns):
            batch, codes = check_batch(raw, task.allow_private_hosts, pool, task.image_root)
            hashes = np.zeros(len(codes), np.uint64)
            hashes[codes == 0] = url_hashes(pc.filter(batch.column(0), pa.array(codes == 0)))
            seen = mark_repeats(hashes, codes, seen)
            counts.update({REASONS[c - 1]: int(n) for c, n in zip(*np.unique(codes[codes > 0],
                                                                              return_counts=True))})
            counts["rows"] += len(codes)
            writer.write(batch.filter(pa.array(codes == 0)))
            refused.append(_refused_sample(raw, codes, sampled))
    task.hashes.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(task.hashes) as tmp, open(tmp, "wb") as f:
        np.save(f, seen)
    return {**_write_refused(task, [t for t in refused if t is not None]),
            **_part_result(task, writer), "counts": dict(counts)}


def _write_refused(task: PartTask, tables: list[pa.Table]) -> dict:
    """Write the part's sample of refused rows; return a few examples per reason."""
    if not tables:
        return {"examples": {}}
    table = pa.concat_tables(tables)
    with atomic_path(task.refused_dir / f"part-{task.index:05d}.parquet") as tmp:
        pq.write_table(table, tmp)
    examples: dict[str, list[str]] = {}
    for url, reason in zip(table.column("url").to_pylist(), table.column("reason").to_pylist()):
        shown = examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_KIND:
            shown.append(repr(url)[:200])
    return {"examples": examples}


def _part_result(task: PartTask, writer: "_BatchWriter") -> dict:
    return {"index": task.index, "kept": writer.rows, "sha256": writer.fingerprint()}


def _feed_text(digests: list, column: pa.Array) -> None:
    """Feed the exact content of a text column to two digests, one for the values' lengths,
    one for their bytes (never buffer padding): a fingerprint that depends neither on the
    parquet writer's version nor on where batches begin and end."""
    column = column.cast(pa.large_string())
    _, offsets, data = column.buffers()
    ends = np.frombuffer(offsets, np.int64, len(column) + 1, column.offset * 8)
    digests[0].update(np.diff(ends))
    if data is not None:
        digests[1].update(memoryview(data)[ends[0]:ends[-1]])


class _NothingKept(Exception):
    pass


class _BatchWriter:
    """Batches appended to a parquet file, opened with the first non-empty batch; their url and
    caption columns fingerprinted."""

    def __init__(self, path: Path):
        self.path, self.rows, self._writer = path, 0, None
        self._digests = [hashlib.sha256() for _ in range(4)]  # url, caption: lengths, bytes

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            for i, column in enumerate(batch.columns[:2]):
                _feed_text(self._digests[2 * i:2 * i + 2], column)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, batch.schema, **PARQUET_OPTIONS)
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(d.hexdigest() for d in self._digests).encode()).hexdigest()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@contextlib.contextmanager
def _part_writer(path: Path) -> Iterator[_BatchWriter]:
    """A cleaned part written batch by batch, moved into place when complete; no file (and none
    left from before) when no row was written."""
    try:
        with atomic_path(path) as tmp:
            writer = _BatchWriter(tmp)
            try:
                yield writer
            finally:
                writer.close()
            if not writer.rows:
                raise _NothingKept
    except _NothingKept:
        path.unlink(missing_ok=True)


def cross_part_repeats(hash_files: list[Path],
                       merge_rows: int = MERGE_ROWS) -> dict[int, np.ndarray]:
    """{part index: the URL hashes an earlier part already holds}, merging the parts' sorted
    hashes one range of the hash space (about `merge_rows` hashes) at a time."""
    arrays = {i: np.load(path, mmap_mode="r") for i, path in enumerate(hash_files)
              if path.exists()}
    total = sum(len(a) for a in arrays.values())
    ranges = max(1, math.ceil(total / merge_rows))
    bounds = [np.uint64((r << 64) // ranges) for r in range(ranges)]
    repeats: dict[int, list[np.ndarray]] = {}
    for r in range(ranges):
        slices = {}
        for i, a in arrays.items():
            lo = np.searchsorted(a, bounds[r])
            hi = np.searchsorted(a, bounds[r + 1]) if r + 1 < ranges else len(a)
            slices[i] = np.asarray(a[lo:hi])
        hashes = np.concatenate([*slices.values(), np.empty(0, np.uint64)])
        owners = np.concatenate([np.full(len(s), i) for i, s in slices.items()]
                                + [np.empty(0, np.int64)])
        order = np.lexsort((owners, hashes))  # by hash, then part: the first part keeps it
        later = np.flatnonzero(hashes[order][1:] == hashes[order][:-1]) + 1
        for i in np.unique(owners[order[later]]).astype(int):
            repeats.setdefault(i, []).append(hashes[order[later]][owners[order[later]] == i])
    return {i: np.concatenate(h) for i, h in repeats.items()}


def drop_repeats(task_and_hashes: tuple[PartTask, np.ndarray]) -> dict:
    """Rewrite a cleaned part, batch by batch, without the rows whose URL hash is given."""
    task, repeats = task_and_hashes
    dropped = 0
    with _part_writer(task.cleaned) as writer:
        for batch in pq.ParquetFile(task.cleaned).iter_batches(BATCH_ROWS):
            keep = ~np.isin(url_hashes(batch.column(0)), repeats)
            dropped += int((~keep).sum())
            writer.write(batch.filter(pa.array(keep)))
    return {**_part_result(task, writer), "duplicate_url": dropped}


def clean_url_list(parts: list[Path], columns: Columns, out: Path, allow_private_hosts: bool,
                   processes: int = 1, distributor: str = "multiprocessing",
                   image_root: str | None = None) -> dict:
    """Clean every part into OUT/_vlp_urls/parts (see the module docstring); return the
    report: rows, kept, dropped per reason, examples, and the cleaned parts' fingerprint."""
    work_dir, refused_dir = out / WORK_DIR, out / REFUSED_DIR
    for folder in (work_dir, refused_dir):
        shutil.rmtree(folder, ignore_errors=True)
    refused_dir.mkdir(parents=True)
    tasks = [PartTask(i, part, columns, work_dir, refused_dir, allow_private_hosts, image_root)
             for i, part in enumerate(parts)]
    results = {r["index"]: r for r in run_tasks(clean_part, tasks, processes, distributor)}
    repeats = cross_part_repeats([task.hashes for task in tasks])
    rewritten = run_tasks(drop_repeats, [(tasks[i], h) for i, h in sorted(repeats.items())],
                          processes, distributor)
    counts = Counter()
    for result in results.values():
        counts.update(result["counts"])
    for result in rewritten:
        results[result["index"]].update(kept=result["kept"], sha256=result["sha256"])
        counts["duplicate_url"] += result["duplicate_url"]
    report = _report(counts, results.values())
    write_json_atomic(refused_dir / "refused_urls.json",
                      {k: report[k] for k in ("rows", "kept", "dropped")})
    return report


def _report(counts: Counter, results) -> dict:
    rows = counts.pop("rows", 0)
    examples: dict[str, list[str]] = {}
    for result in results:
        for reason, shown in result["examples"].items():
            examples.setdefault(reason, []).extend(shown)
    digest = hashlib.sha256("".join(r["sha256"] for r in results).encode()).hexdigest()
    return {"parts": len(results), "rows": rows, "kept": sum(r["kept"] for r in results),
            "dropped": {r: counts[r] for r in REASONS if counts[r]},
            "examples": {k: v[:EXAMPLES_PER_KIND] for k, v in examples.items()},
            "rows_sha256": digest}

