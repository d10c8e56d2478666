"""An interrupted download: `vlp data download` (img2dataset underneath) SIGKILLed while it
fetches a shard from a slow loopback server, then run again with the same arguments."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pandas as pd
import pytest
from train_helpers import REPO

from vlp.data_prep.index import build_manifest
from vlp.data_prep.server import QuietHandler, serve_directory
from vlp.pipeline.data.manifest import load_manifest

pytestmark = pytest.mark.slow

ROWS, PER_SHARD = 48, 12  # 4 shards
DELAY_S = 0.25  # per image; 2 threads: ~1.5 s per shard, so the kill lands inside shard 2


class SlowLoggingHandler(QuietHandler):
    """Serves files after a delay and records every requested path."""

    requests: list[str] = []
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            self.requests.append(self.path)
        time.sleep(DELAY_S)
        try:
            super().do_GET()
        except (BrokenPipeError, ConnectionResetError):  # the client was killed meanwhile
            pass


def download_command(url_list, out) -> list[str]:
    vlp = shutil.which("vlp")
    return [*([vlp] if vlp else ["python", "-m", "vlp.pipeline.cli"]), "data", "download",
            "--url-list", str(url_list), "--out", str(out), "--image-size", "32",
            "--number-sample-per-shard", str(PER_SHARD), "--processes", "1", "--threads", "2",
            "--timeout", "10", "--allow-private-hosts"]


def test_an_interrupted_download_resumes_without_refetching_finished_shards(world_dir, tmp_path):
    out = tmp_path / "shards"
    SlowLoggingHandler.requests = []
    with serve_directory(world_dir, handler=SlowLoggingHandler) as base:
        world = pd.read_parquet(world_dir / "train/url_list.parquet").head(ROWS)
        paths = [url.split("/", 3)[3] for url in world["url"]]  # train/images/NNNNNN.jpg
        url_list = tmp_path / "urls.parquet"
        world.assign(url=[f"{base}/{path}" for path in paths]).to_parquet(url_list)
        shard_of = {f"/{path}": row // PER_SHARD for row, path in enumerate(paths)}

        proc = subprocess.Popen(download_command(url_list, out), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not any(shard_of.get(p) == 2 for p in list(SlowLoggingHandler.requests)):
                assert proc.poll() is None, f"download ended early (rc={proc.returncode})"
                assert time.monotonic() < deadline, "shard 2 was never started"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # img2dataset's worker and logger processes too
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        first = list(SlowLoggingHandler.requests)
        done = sorted(p.name for p in out.glob("*_stats.json"))
        assert done == ["00000_stats.json", "00001_stats.json"], done
        assert not (out / "manifest.json").exists()  # nothing lists the half-written shard 2
        finished = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[01].tar")}
        interrupted = tmp_path / "interrupted"
        shutil.copytree(out, interrupted)

        SlowLoggingHandler.requests = []
        start = time.monotonic()
        resumed = subprocess.run(download_command(url_list, out), cwd=REPO, capture_output=True,
                                 text=True, timeout=300)
        print(f"killed after {len(first)} requests; resume took {time.monotonic() - start:.1f} s "
              f"and {len(SlowLoggingHandler.requests)} requests")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        second = list(SlowLoggingHandler.requests)

    assert {shard_of[p] for p in first} == {0, 1, 2}
    assert {shard_of[p] for p in second} == {2, 3}  # finished shards were not fetched again
    assert sorted(second) == sorted(p for p in shard_of if shard_of[p] >= 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[01].tar")} == finished

    manifest = load_manifest(out)
    assert manifest["problems"] == [] and manifest["total_samples"] == ROWS
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        (f"{i:05d}.tar", PER_SHARD) for i in range(4)]

    # Indexing the interrupted folder by hand reports the half-written shard instead of
    # trusting it.
    problems = {(p["shard"], p["kind"]) for p in build_manifest(interrupted)["problems"]}
    assert ("00002.tar", "missing_stats") in problems
