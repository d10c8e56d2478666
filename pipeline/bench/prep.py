"""`vlp bench prep`: URL-list sanitisation (data_prep.clean) vs checking one row at a time.

Data: synthetic LAION-style parquet parts (URL, TEXT): https URLs on host names drawn from a
Zipf law over 20,000 hosts, 1% ftp URLs, 1% empty captions, 2% URLs repeated from earlier rows
(of the same or another part). Lookups are off (`allow_private_hosts`): a host name lookup
waits on a resolver, not on a core, so the figure is the CPU work per row; the lookups are one
per distinct host, 64 at a time, and cached.

Ours: clean_url_list over the parts, one process (rows per second of CPU time of that process:
a core-second). Reference: the same rules row by row in Python (url_problem and decode_caption per row) over `--reference-rows` of the first part.
Each runs in a fresh subprocess; peak memory is the growth of its RSS (sampled every 5 ms) over
the RSS after imports, for `--parts` parts and for 4 x as many: flat memory means the two peaks
match. Then the 400M-row projection of docs/data_prep.md.
"""
from __future__ import annotations

import json
import subprocess
import sys

from vlp.pipeline.bench.common import environment, format_table, out_path, write_json

LAION_400M = 400_000_000
# img2dataset's published LAION-400M run: about 1,300 samples/s on one 16-core node, 3.5 days.
IMG2DATASET_SAMPLES_PER_NODE_S = 1300
NODE_CORES = 16


def add_arguments(p) -> None:
    p.add_argument("--rows-per-part", type=int, default=500_000, help="rows in each part")
    p.add_argument("--parts", type=int, default=2, help="parts (the memory check runs 4x too)")
    p.add_argument("--reference-rows", type=int, default=100_000,
                   help="rows the row-by-row reference checks")
    p.add_argument("--executors", type=int, nargs="+", default=[1, 10, 100],
                   help="16-core nodes for the 400M-row projection")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "FOLDER", "ROWS"),
                   help="internal: one measurement in this process")


def write_parts(folder, parts: int, rows: int, seed: int) -> None:
    """LAION-style parts (URL, TEXT) with a known share of refused and repeated rows."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for part in range(parts):
        ids = np.arange(part * rows, (part + 1) * rows)
        repeat = rng.random(rows) < 0.02
        ids[repeat] = rng.integers(0, max(1, part * rows + 1), repeat.sum())
        hosts = np.minimum(rng.zipf(1.3, rows), 20_000)
        scheme = np.where(rng.random(rows) < 0.01, "ftp", "https")
        urls = [f"{s}://img{h}.cdn{h % 97}.example-shop.com/p/{i:09d}/photo.jpg?w=640"
                for s, h, i in zip(scheme, hosts, ids)]
        captions = np.where(rng.random(rows) < 0.01, " ",
                            [f"A photo of product {i}, studio lighting" for i in ids])
        pd.DataFrame({"URL": urls, "TEXT": captions}).to_parquet(
            Path(folder) / f"part-{part:05d}.parquet", row_group_size=100_000)


def _reference(folder: str, rows: int) -> int:
    """The rules row by row, as before: url_problem, then decode_caption, per row."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from vlp.data_prep.urls import url_problem
    from vlp.pipeline.data.errors import BadData
    from vlp.pipeline.data.transforms import decode_caption

    table = pq.read_table(sorted(Path(folder).glob("*.parquet"))[0]).slice(0, rows)
    kept, seen = 0, set()
    for url, caption in zip(*(c.to_pylist() for c in table.columns)):
        if url_problem(url, True) or url.strip() in seen:
            continue
        try:
            decode_caption(caption.encode())
        except BadData:
            continue
        seen.add(url.strip())
        kept += 1
    return table.num_rows


def _ours(folder: str) -> int:
    import tempfile
    from pathlib import Path

    from vlp.data_prep.clean import clean_url_list
    from vlp.data_prep.url_lists import find_columns, list_parts

    parts = list_parts(folder)
    with tempfile.TemporaryDirectory() as out:
        report = clean_url_list(parts, find_columns(parts[0], None, None), Path(out), True)
    return report["rows"]


class PeakRSS:
    """The peak resident memory of this process while in the block, sampled every 5 ms from
    /proc (ru_maxrss cannot see a peak below one reached earlier, e.g. while importing)."""

    def __enter__(self):
        import threading

        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def worker(kind: str, folder: str, rows: int) -> None:
    """Time one implementation in this fresh process (imports done first); print JSON."""
    import time

    import pyarrow.parquet  # noqa: F401

    import vlp.data_prep.clean  # noqa: F401

    if kind == "reference":
        import vlp.pipeline.data.transforms  # noqa: F401 - its decode_caption (torch)
    with PeakRSS() as memory:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        done = _ours(folder) if kind == "ours" else _reference(folder, rows)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({"rows": done, "cpu_s": cpu, "wall_s": wall,
                      "peak_growth_bytes": memory.peak - memory.start}))


def _measure(kind: str, folder, rows: int = 0) -> dict:
    command = [sys.executable, "-m", "vlp.pipeline.bench.prep", "--worker", kind, str(folder),
               str(rows)]
    result = json.loads(subprocess.run(command, check=True, capture_output=True,
                                       text=True).stdout.splitlines()[-1])
    result["rows_per_core_s"] = result["rows"] / result["cpu_s"]
    result["peak_mb_per_million_rows"] = result["peak_growth_bytes"] / 2**20 / result["rows"] * 1e6
    return result


def projection(rows_per_core_s: float, executors: list[int]) -> list[dict]:
    """Hours to sanitise and to download LAION-400M on N 16-core nodes."""
    return [{"nodes": n,
             "sanitise_h": LAION_400M / (rows_per_core_s * NODE_CORES * n) / 3600,
             "img2dataset_download_h": LAION_400M / (IMG2DATASET_SAMPLES_PER_NODE_S * n) / 3600}
            for n in executors]


def run(args) -> int:
    import tempfile
    from pathlib import Path

    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return 0
    rows, parts = (20_000, 1) if args.quick else (args.rows_per_part, args.parts)
    reference_rows = min(args.reference_rows, rows)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small", Path(tmp) / "large"
        write_parts(small, parts, rows, args.seed)
        write_parts(large, 4 * parts, rows, args.seed)
        results = {"reference": _measure("reference", small, reference_rows),
                   "ours": _measure("ours", small),
                   f"ours_{4 * parts}_parts": _measure("ours", large)}
    table = [[name, r["rows"], r["rows_per_core_s"], r["peak_mb_per_million_rows"],
              r["peak_growth_bytes"] / 2**20] for name, r in results.items()]
    print(format_table(["implementation", "rows", "rows/core-s", "peak MB / M rows", "peak MB"],
                       table, "URL-list sanitisation (one process)"))
    plan = projection(results["ours"]["rows_per_core_s"], args.executors)
    print(format_table(["16-core nodes", "sanitise h", "img2dataset download h"],
                       [[p["nodes"], p["sanitise_h"], p["img2dataset_download_h"]] for p in plan],
                       "LAION-400M"))
    speedup = results["ours"]["rows_per_core_s"] / results["reference"]["rows_per_core_s"]
    print(f"speed-up over row by row: {speedup:.1f}x")
    path = write_json(out_path(args, "prep"), {
        "benchmark": "prep", "environment": environment(), "rows_per_part": rows, "parts": parts,
        "results": results, "speedup": speedup, "projection_400m": plan})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.set_defaults(quick=False, out=None)
    raise SystemExit(run(parser.parse_args()))
