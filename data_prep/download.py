"""Download a URL list into webdataset shards with img2dataset, then index them.

The URL list is sanitized first, part by part in worker processes (data_prep.clean), into a
folder of clean parquet parts that img2dataset reads; refused rows are counted and sampled in
OUT/refused/. img2dataset's incremental mode resumes an
interrupted job: shards that have their NNNNN_stats.json are kept, the others are fetched again.
That works because sanitizing is deterministic, so the same rows land in the same shards; a
record beside the shards (`vlp_download`: a fingerprint of the sanitized rows and the settings
that shape the shards) makes sure of it, and a resume with another URL list or other settings is
refused instead of mixing two datasets. Starting over (`incremental=False`) deletes only what a
download writes: img2dataset's numbered shard files, the index and the record.
The output may be an object-store prefix (s3://bucket/shards; data_prep.folder): sanitising then
works in a local temporary folder, img2dataset writes the shards through fsspec, and the refused
rows are uploaded beside them.
img2dataset spawns worker processes, so a script calling this needs `if __name__ == "__main__":`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlp.data_prep.folder import Folder
from vlp.pipeline.data.errors import UserError, warn
from vlp.pipeline.data.object_store import is_object_url

# data_prep.index (torch) and data_prep.clean (pandas, pyarrow) are imported where they are used:
# `vlp` imports this module for RESIZE_MODES / DISTRIBUTORS on every command.

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
DISTRIBUTORS = ("multiprocessing", "pyspark")
# What a download wrote, and therefore what it may delete: img2dataset's numbered shard files,
# the index, and the record of what was downloaded. Not a *.json: img2dataset's incremental mode
# takes every *.json in the folder for a shard's stats.
SHARD_FILE = re.compile(r"\d+(\.tar|\.parquet|_stats\.json)")
RECORD = "vlp_download"
# Fewer shards than this get a warning: the loader needs one per rank and loader worker.
FEW_SHARDS = 8
IMAGE_LIST = "_vlp_images.parquet"  # --images: the folder's rows, while they are sanitised


def _clear_previous(out: Folder, incremental: bool, record: dict) -> None:
    """Make `out` ready for img2dataset: delete our index (rebuilt afterwards) and, when starting
    over, the previous download; refuse to resume another download or next to foreign *.json."""
    from vlp.data_prep.index import MANIFEST, SIZES

    names = out.names()
    downloaded = [name for name in names if SHARD_FILE.fullmatch(name)]
    if incremental and downloaded:
        _check_same_download(out, record)
    stale = [MANIFEST, SIZES]
    if not incremental:
        # Not img2dataset's "overwrite" mode: in 1.47 it deletes its own _tmp folder, then fails.
        stale += [*downloaded, RECORD]
        out.delete(["_tmp"], recursive=True)
    foreign = [name for name in names if name.endswith(".json") and name not in stale + downloaded]
    if foreign:
        raise UserError(f"{out} holds {', '.join(foreign)}: img2dataset takes every *.json in "
                        "the output folder for a shard's stats. Move them out, or choose another "
                        "--out.")
    out.delete(stale)


def _check_same_download(out: Folder, record: dict) -> None:
    try:
        previous = json.loads(out.read(RECORD))
    except (OSError, TypeError, ValueError):  # TypeError: no record
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


def _index_download(out: Folder, url_list, processes: int) -> tuple[dict, dict]:
    """(the index of `out`, counted from img2dataset's stats, and the shards dropped for a
    retry) after img2dataset: a UserError when nothing arrived or a shard is damaged (a full
    disk: img2dataset logs it and goes on)."""
    from vlp.data_prep.index import build_manifest

    to_retry = _drop_empty_shards(out)
    errors = dict(to_retry["errors"].most_common(5))
    if not _downloaded_shards(out):
        raise UserError(f"no image of {url_list} could be downloaded into {out}: {errors}; the "
                        "rerun of this command retries them")
    dropped = to_retry["shards"]
    if dropped:
        warn(f"{len(dropped)} shard(s) got no image ({', '.join(dropped[:5])}: {errors}) and "
             f"were deleted, so the shard numbers in {out} have a gap: rerun this command to "
             "fetch them again before training on the whole range")
    manifest = build_manifest(out.location, from_stats=True, processes=processes)
    if manifest["problems"]:
        shards = sorted({p["shard"] for p in manifest["problems"]})
        raise UserError(f"{len(shards)} shard(s) in {out} are incomplete or damaged "
                        f"({', '.join(shards[:5])}: {manifest['problems'][0]['detail']}); "
                        "free the space or fix the cause, then rerun the same command: shards "
                        "without their stats are fetched again")
    return manifest, to_retry


def _downloaded_shards(out: Folder) -> list[str]:
    """The names of img2dataset's NNNNN.tar files in `out`."""
    return [name for name in out.names() if name.endswith(".tar") and SHARD_FILE.fullmatch(name)]


def _drop_empty_shards(out: Folder) -> dict:
    """Delete the shards img2dataset finished without a single image (an outage, a dead host):
    their stats would make a resume take them for done. Returns how many and their errors."""
    from collections import Counter

    from vlp.data_prep.index import read_stats

    dropped, errors = [], Counter()
    for name in _downloaded_shards(out):
        stats, _ = read_stats(out.url(name))
        if stats and stats["successes"] == 0:
            dropped.append(name)
            errors.update(stats["errors"])
            stem = name[: -len(".tar")]
            out.delete([name, f"{stem}.parquet", f"{stem}_stats.json"])
    return {"shards": dropped, "errors": errors}


def _warn_if_few_shards(out: Folder, shards: int, rows: int, per_shard: int) -> None:
    """Training needs a shard per rank and loader worker; say so while the fix is cheap."""
    if shards >= FEW_SHARDS or per_shard == 1:
        return
    smaller = max(1, rows // FEW_SHARDS)
    warn(f"{out} holds {shards} shard(s) of up to {per_shard} samples; training on them needs "
         "at least ranks x data.num_workers shards: rerun with --no-resume --samples-per-shard "
         f"{smaller} for {math.ceil(rows / smaller)} shards")


def _check_options(out_dir, max_image_mb: float, resize_mode: str, distributor: str) -> None:
    if "://" in str(out_dir) and not is_object_url(str(out_dir)):
        raise UserError(f"--out {out_dir}: shards are written to a local or shared filesystem "
                        "folder or to object storage (s3://, gs://, ...), not to this URL")
    if not 0 < max_image_mb < float("inf"):
        raise UserError(f"max_image_mb must be a finite number > 0, got {max_image_mb}")
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    if distributor not in DISTRIBUTORS:
        raise UserError(f"distributor {distributor!r} is not one of {DISTRIBUTORS}")


def _run_img2dataset(url_list: Path, out: str, allow_private_hosts: bool, max_image_bytes: int,
                     image_root: str | None, **options) -> None:
    """img2dataset a folder of clean (url, caption) parquet parts into webdataset shards in
    `out`, fetching through data_prep.fetch (every redirect hop and address checked, bodies
    bounded)."""
    # Imported here: it takes seconds (wandb, albumentations, cv2). fetch first: it keeps
    # albumentations from asking PyPI for updates.
    from vlp.data_prep.fetch import SafeDownloader

    import img2dataset

    main_module = importlib.import_module("img2dataset.main")  # `img2dataset.main` is a function

    sigint = signal.getsignal(signal.SIGINT)
    main_module.Downloader = functools.partial(
        SafeDownloader, allow_private_hosts=allow_private_hosts, max_image_bytes=max_image_bytes,
        image_root=image_root)
    try:
        img2dataset.download(
            url_list=str(url_list),
            output_folder=out,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="webdataset",
            incremental_mode="incremental",
            **options,
        )
    finally:
        main_module.Downloader = SafeDownloader.__base__
        # img2dataset leaves its SIGINT handler installed: Ctrl-C would then exit(0) quietly.
        signal.signal(signal.SIGINT, sigint)


@dataclass(frozen=True)
class ListSpec:
    """Where the URL list is (or the folder of images, `images`) and which of its columns to
    read."""

    url_list: str | None
    images: str | None = None
    url_col: str | None = None
    caption_col: str | None = None
    input_format: str | None = None
    save_additional_columns: tuple[str, ...] = ()


@contextlib.contextmanager
def _work_dir(out: Folder) -> Iterator[Path]:
    """Where sanitising writes its parts and refused rows: `out` itself on local disk, a local
    temporary folder when `out` is in object storage (the refused rows are uploaded from it)."""
    if not out.in_store:
        yield Path(out.location)
        return
    with tempfile.TemporaryDirectory(prefix="vlp-download-") as tmp:
        yield Path(tmp)


def _sanitize(spec: ListSpec, work: Path, allow_private_hosts: bool, processes: int,
              distributor: str) -> dict:
    """Clean the list's parts into WORK/_vlp_urls/parts (data_prep.clean); refuse an empty
    result."""
    from vlp.data_prep.clean import clean_url_list
    from vlp.data_prep.local_images import image_root, write_image_list
    from vlp.data_prep.url_lists import find_columns, list_parts

    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        root = image_root(spec.images) if spec.images else None
        source = write_image_list(spec.images, work / IMAGE_LIST) if spec.images else spec.url_list
        parts = list_parts(source, spec.input_format)
        columns = find_columns(parts[0], spec.url_col, spec.caption_col,
                               spec.save_additional_columns)
        report = clean_url_list(parts, columns, work, allow_private_hosts, processes,
                                distributor, root)
        if not report["kept"]:
            hint = ("; private, loopback and link-local hosts are refused unless "
                    "--allow-private-hosts is given" if "private_host" in report["dropped"]
                    else "")
            raise UserError(f"no URL in {spec.images or spec.url_list} is left to download: "
                            f"{report['dropped']}{hint}")
    except UserError:
        if created:  # a list with nothing to download leaves no folder behind
            shutil.rmtree(work)
        raise
    finally:
        (work / IMAGE_LIST).unlink(missing_ok=True)
    return {**report, "image_root": root}


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
    max_image_mb: float = 32,
    img2dataset_options: dict | None = None,
    **list_spec,
) -> dict:
    """Sanitize `url_list` (a file, folder or glob of parts; `list_spec`: the ListSpec fields;
    `url_list=None, images=DIR`: the images of a local folder), run img2dataset into
    `out_dir` (a folder, or an object-store prefix such as s3://bucket/shards), index it; return
    the summary.

    With `incremental=False` an earlier download in `out_dir` is deleted first (other files stay);
    resuming one made from another URL list or with other settings is a UserError. The pyspark
    distributor uses the active SparkSession, or starts a local one, for sanitising and
    downloading. A shard none of whose images arrived is deleted (`shards_to_retry`), so that
    resuming fetches it again; a download that got no image at all, or left a shard the index
    finds damaged, is a UserError. Images over `max_image_mb` are refused while fetching.
    `img2dataset_options` go to img2dataset as they are (data_prep.img2dataset_options).
    """
    from vlp.data_prep.clean import REFUSED_DIR, WORK_DIR
    from vlp.data_prep.download_progress import ShardProgress, expected_shards

    _check_options(out_dir, max_image_mb, resize_mode, distributor)
    spec = ListSpec(url_list and str(url_list), **list_spec)
    out = Folder(out_dir)
    out.check_bucket()
    with _work_dir(out) as work:
        sanitized = _sanitize(spec, work, allow_private_hosts, processes, distributor)
        root = sanitized.pop("image_root")
        record = {"url_list": spec.images or spec.url_list, "rows": sanitized.pop("kept"),
                  "rows_sha256": sanitized.pop("rows_sha256"), "image_size": image_size,
                  "resize_mode": resize_mode, "number_sample_per_shard": number_sample_per_shard}
        try:
            _clear_previous(out, incremental, record)
            out.write_json(RECORD, record)
            if out.in_store:
                out.upload(work / REFUSED_DIR, REFUSED_DIR)
            parts = sorted((work / WORK_DIR / "parts").glob("*.parquet"))
            with ShardProgress(out, expected_shards(parts, number_sample_per_shard)):
                _run_img2dataset(
                    work / WORK_DIR / "parts", out.location,
                    allow_private_hosts=allow_private_hosts,
                    max_image_bytes=int(max_image_mb * 2**20), image_root=root,
                    image_size=image_size, resize_mode=resize_mode, processes_count=processes,
                    thread_count=threads, number_sample_per_shard=number_sample_per_shard,
                    timeout=timeout, retries=retries, distributor=distributor,
                    save_additional_columns=list(spec.save_additional_columns) or None,
                    **(img2dataset_options or {}))
        finally:
            shutil.rmtree(work / WORK_DIR, ignore_errors=True)
    manifest, to_retry = _index_download(out, record["url_list"], processes)
    _warn_if_few_shards(out, manifest["total_shards"], record["rows"], number_sample_per_shard)
    return {
        "url_list": record["url_list"],
        "shards": out.location,
        "sanitized": {"kept": record["rows"], **sanitized},
        "refused_rows": out.url(REFUSED_DIR),
        "downloaded": manifest["stats_totals"],
        "download_errors": manifest["download_errors"],
        "shards_to_retry": to_retry["shards"],
        "errors_of_shards_to_retry": dict(to_retry["errors"]),
        "total_shards": manifest["total_shards"],
        "total_samples": manifest["total_samples"],
        "sample_issues": manifest["sample_issues"],
        "problems": manifest["problems"],
    }
