"""Download a URL list into webdataset shards with img2dataset, then index them.

The URL list is sanitized first (see data_prep.urls). img2dataset's incremental mode resumes an
interrupted job: shards that have their NNNNN_stats.json are kept, the others are fetched again.
That works because sanitizing is deterministic, so the same rows land in the same shards.
img2dataset spawns worker processes, so a script calling this needs `if __name__ == "__main__":`.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from vlp.pipeline.data.errors import UserError

# data_prep.index (torch) and data_prep.urls (pandas, pyarrow) are imported where they are used:
# `vlp` imports this module for RESIZE_MODES / DISTRIBUTORS on every command.

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
DISTRIBUTORS = ("multiprocessing", "pyspark")


def _clear_previous(out: Path, incremental: bool) -> None:
    """Remove what must not be in `out` when img2dataset starts."""
    from vlp.data_prep.index import MANIFEST, SIZES

    # img2dataset takes every *.json in the output folder for a shard's stats: remove ours
    # (rebuilt afterwards) or an incremental run fails parsing "manifest" as a shard number.
    stale = [out / MANIFEST, out / SIZES]
    if not incremental:
        # Not img2dataset's "overwrite" mode: in 1.47 it deletes its own _tmp folder, then fails.
        stale += [*out.glob("*.tar"), *out.glob("*.parquet"), *out.glob("*_stats.json")]
        shutil.rmtree(out / "_tmp", ignore_errors=True)
    for path in stale:
        path.unlink(missing_ok=True)


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

    With `incremental=False` the shards already in `out_dir` are deleted first. The pyspark
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
    _clear_previous(out, incremental)
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
