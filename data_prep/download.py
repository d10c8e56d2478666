"""Download a URL list into webdataset shards with img2dataset, then index them.

The URL list is sanitized first (see data_prep.urls). img2dataset's incremental mode resumes an
interrupted job: shards that have their NNNNN_stats.json are kept, the others are fetched again.
That works because sanitizing is deterministic, so the same rows land in the same shards; a
record beside the shards (`vlp_download`: a fingerprint of the sanitized rows and the settings
that shape the shards) makes sure of it, and a resume with another URL list or other settings is
refused instead of mixing two datasets. Starting over (`incremental=False`) deletes only what a
download writes: img2dataset's numbered shard files, the index and the record.
img2dataset spawns worker processes, so a script calling this needs `if __name__ == "__main__":`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import write_json_atomic

# data_prep.index (torch) and data_prep.urls (pandas, pyarrow) are imported where they are used:
# `vlp` imports this module for RESIZE_MODES / DISTRIBUTORS on every command.

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
DISTRIBUTORS = ("multiprocessing", "pyspark")
# What a download wrote, and therefore what it may delete: img2dataset's numbered shard files,
# the index, and the record of what was downloaded. Not a *.json: img2dataset's incremental mode
# takes every *.json in the folder for a shard's stats.
SHARD_FILE = re.compile(r"\d+(\.tar|\.parquet|_stats\.json)")
RECORD = "vlp_download"


def _clear_previous(out: Path, incremental: bool, record: dict) -> None:
    """Make `out` ready for img2dataset: delete our index (rebuilt afterwards) and, when starting
    over, the previous download; refuse to resume another download or next to foreign *.json."""
    from vlp.data_prep.index import MANIFEST, SIZES

    downloaded = [p for p in out.iterdir() if SHARD_FILE.fullmatch(p.name)]
    if incremental and downloaded:
        _check_same_download(out, record)
    stale = [out / MANIFEST, out / SIZES]
    if not incremental:
        # Not img2dataset's "overwrite" mode: in 1.47 it deletes its own _tmp folder, then fails.
        stale += [*downloaded, out / RECORD]
        shutil.rmtree(out / "_tmp", ignore_errors=True)
    foreign = sorted(p.name for p in out.glob("*.json") if p not in stale + downloaded)
    if foreign:
        raise UserError(f"{out} holds {', '.join(foreign)}: img2dataset takes every *.json in "
                        "the output folder for a shard's stats. Move them out, or choose another "
                        "--out.")
    for path in stale:
        path.unlink(missing_ok=True)


def _check_same_download(out: Path, record: dict) -> None:
    try:
        previous = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict):
        raise UserError(f"{out} holds shards but no readable {RECORD} record of what they were "
                        "downloaded from, so resuming could mix two datasets. Use another --out, "
                        "or --no-resume to delete them and start over.")
    changed = sorted(k for k in record if k != "url_list" and previous.get(k) != record[k])
    if "rows_sha256" in changed:
        raise UserError(f"{out}: its shards were downloaded from another URL list "
                        f"({previous.get('url_list')}, {previous.get('rows')} usable rows; now "
                        f"{record['url_list']}, {record['rows']}). Resuming would mix two "
                        "datasets: use another --out, or --no-resume to delete them and start "
                        "over.")
    if changed:
        details = ", ".join(f"{k} {previous.get(k)!r} -> {record[k]!r}" for k in changed)
        raise UserError(f"{out}: its shards were downloaded with other settings ({details}). "
                        "Use the same settings to resume, another --out, or --no-resume.")


def download_record(url_list, frame, **settings) -> dict:
    """What decides which image lands in which shard, and how it is stored."""
    import hashlib

    import pandas as pd

    row_hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return {"url_list": str(url_list), "rows": len(frame),
            "rows_sha256": hashlib.sha256(row_hashes.tobytes()).hexdigest(), **settings}


def _run_img2dataset(url_list: Path, out: Path, **options) -> None:
    """img2dataset a clean (url, caption) parquet into webdataset shards in `out`."""
    # Imported here: it takes seconds (wandb, albumentations, cv2). albumentations would also ask PyPI for updates in each process.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    sigint = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(
            url_list=str(url_list),
            output_folder=str(out),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="webdataset",
            incremental_mode="incremental",
            **options,
        )
    finally:
        # img2dataset leaves its SIGINT handler installed: Ctrl-C would then exit(0) quietly.
        signal.signal(signal.SIGINT, sigint)


def download_shards(
    url_list,
    out_dir,
    image_size: int = 256,
    resize_mode: str = "center_crop",
    processes: int = 1,
    threads: int = 8,
    number_sample_per_shard: int = 1000,
    timeout: int = 10,
    allow_private_hosts: bool = False,
    distributor: str = "multiprocessing",
    incremental: bool = True,
    retries: int = 0,
    url_col: str = "url",
    caption_col: str = "caption",
) -> dict:
    """Sanitize `url_list`, run img2dataset into `out_dir`, index it; return the summary.

    With `incremental=False` an earlier download in `out_dir` is deleted first (other files stay);
    resuming one made from another URL list or with other settings is a UserError. The pyspark
    distributor uses the active SparkSession, or starts a local one.
    """
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    if distributor not in DISTRIBUTORS:
        raise UserError(f"distributor {distributor!r} is not one of {DISTRIBUTORS}")
    from vlp.data_prep.index import build_manifest
    from vlp.data_prep.urls import read_url_list, sanitize

    frame, sanitized = sanitize(read_url_list(url_list, url_col, caption_col), allow_private_hosts)
    if frame.empty:
        hint = ("; private, loopback and link-local hosts are refused unless "
                "--allow-private-hosts is given" if "private_host" in sanitized["dropped"] else "")
        raise UserError(f"no URL in {url_list} is left to download: {sanitized['dropped']}{hint}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = download_record(url_list, frame, image_size=image_size, resize_mode=resize_mode,
                             number_sample_per_shard=number_sample_per_shard)
    _clear_previous(out, incremental, record)
    write_json_atomic(out / RECORD, record)
    with tempfile.TemporaryDirectory(prefix="vlp-urls-") as tmp:
        clean_list = Path(tmp) / "url_list.parquet"
        frame.to_parquet(clean_list)
        _run_img2dataset(
            clean_list,
            out,
            image_size=image_size,
            resize_mode=resize_mode,
            processes_count=processes,
            thread_count=threads,
            number_sample_per_shard=number_sample_per_shard,
            timeout=timeout,
            retries=retries,
            distributor=distributor,
        )
    manifest = build_manifest(out)
    return {
        "url_list": str(url_list),
        "shards": str(out),
        "sanitized": sanitized,
        "downloaded": manifest["stats_totals"],
        "download_errors": manifest["download_errors"],
        "total_shards": manifest["total_shards"],
        "total_samples": manifest["total_samples"],
        "sample_issues": manifest["sample_issues"],
        "problems": manifest["problems"],
    }
