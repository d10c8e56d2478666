"""Index a shard directory, local or an object-store prefix (s3://bucket/shards, through fsspec):
manifest.json (per shard: samples counted from the tar, sha256, img2dataset stats, problems) and
OpenCLIP's sizes.json.

`from_stats` takes each shard's sample count from img2dataset's NNNNN_stats.json ("successes")
instead of reading the tar, and checks the tar only for its end-of-archive marker (a shard cut
short by a full disk or a kill has none): no image or caption is read, no sha256 computed, so
indexing after a download does not grow with the size of the images. A shard without readable
stats is read in full. Shards are indexed in `processes` worker processes.

Problems are reported, never raised: missing or unreadable stats (shards from other tools have
none), a tar whose sample count differs from its stats, a truncated or corrupt tar, and stats
whose tar is missing. Samples the training loader will skip (no image, missing, empty or non-UTF-8
caption, and keys the loader skips as "duplicate_key") are counted per shard under `sample_issues`;
`samples` counts what the loader reads, so duplicates are not in it.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

from vlp.data_prep.folder import Folder, name_of
from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.manifest import FORMAT, MANIFEST, SIZES
from vlp.pipeline.data.object_store import filesystem, read_object, read_range
from vlp.pipeline.data.tar import SkipCounter, iter_shard
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS, decode_caption

STATS_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")
LOADER_MEMBERS = (*IMAGE_EXTENSIONS, "txt")  # a sample's members the training loader reads
TAR_BLOCK = 512  # a tar ends with two zero blocks


def error_kind(message: str) -> str:
    """Group img2dataset's per-sample errors: network messages embed URLs, addresses, errnos."""
    http = re.search(r"HTTP Error (\d+)", message)
    if http:
        return f"http {http.group(1)}"
    lowered = message.lower()
    for needle, kind in (
        ("timed out", "timeout"),
        ("connection refused", "connection refused"),
        ("name or service not known", "unknown host"),
        ("(private_host)", "private_host"),  # data_prep.fetch: a hop or address refused
        ("(bad_scheme)", "bad_scheme"),
        ("(invalid_url)", "invalid_url"),
        ("byte limit", "image too large"),
        ("download deadline", "download deadline"),
    ):
        if needle in lowered:
            return kind
    return re.sub(r"0x[0-9a-f]+", "0x...", message)[:80]


def read_stats(tar: str) -> tuple[dict | None, dict | None]:
    """(stats summary, None) from img2dataset's NNNNN_stats.json beside the shard URL `tar`, or
    (None, problem)."""
    url = f"{tar[:-len('.tar')]}_stats.json"
    name = name_of(url)
    try:
        data = read_object(url)
    except OSError as exc:
        return None, {"kind": "bad_stats", "detail": f"{name}: {exc!r}"}
    if data is None:
        return None, {"kind": "missing_stats", "detail": f"no {name}"}
    try:
        raw = json.loads(data)
        stats = {key: int(raw[key]) for key in STATS_COUNTS}
        errors = Counter()
        for message, n in raw.get("status_dict", {}).items():
            if message != "success":
                errors[error_kind(message)] += int(n)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, {"kind": "bad_stats", "detail": f"{name}: {exc!r}"}
    stats["failed"] = stats["failed_to_download"] + stats["failed_to_resize"]
    stats["errors"] = dict(errors)
    return stats, None


def inspect_shard(tar: str) -> dict:
    """One manifest entry for the shard URL `tar`: count samples from the tar itself and compare
    with its stats."""
    samples, issues, problems = 0, Counter(), []
    skipped = SkipCounter()
    try:
        for _, members in iter_shard(tar, skipped, keep_oversized=True):
            samples += 1
            if any(members.get(ext, b"") is None for ext in LOADER_MEMBERS):  # over the limit
                issues["oversized_member"] += 1
                continue
            if not any(ext in members for ext in IMAGE_EXTENSIONS):  # extensions are lower-case
                issues["no_image"] += 1
            try:
                decode_caption(members.get("txt"))
            except BadData as bad:
                issues[bad.kind] += 1
    except BadData as exc:  # the shard is damaged; the samples before the damage were counted
        problems.append({"kind": "corrupt_tar", "detail": f"{exc.kind}: {exc}"})
    issues.update(skipped.counts)
    stats, stats_problem = read_stats(tar)
    if stats_problem:
        problems.append(stats_problem)
    elif stats["successes"] != samples:
        detail = f"tar has {samples} samples, stats say {stats['successes']} successes"
        problems.append({"kind": "count_mismatch", "detail": detail})
    fs, path = filesystem(tar)
    with fs.open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "name": name_of(tar),
        "samples": samples,
        "bytes": fs.size(path),
        "sha256": sha256,
        "stats": stats,
        "sample_issues": dict(issues),
        "problems": problems,
    }


def _has_end_marker(tar: str, size: int) -> bool:
    """Whether the tar ends as a complete archive does: whole blocks, the last two zero."""
    if size < 2 * TAR_BLOCK or size % TAR_BLOCK:
        return False
    return read_range(tar, size - 2 * TAR_BLOCK, 2 * TAR_BLOCK) == bytes(2 * TAR_BLOCK)


def shard_from_stats(tar: str) -> dict:
    """A manifest entry whose sample count is img2dataset's; the tar read in full (see
    inspect_shard) only when its stats are missing or unreadable."""
    stats, problem = read_stats(tar)
    if problem:
        return inspect_shard(tar)
    fs, path = filesystem(tar)
    size = fs.size(path)
    problems = [] if _has_end_marker(tar, size) else [
        {"kind": "corrupt_tar", "detail": "no end-of-archive marker: cut short"}]
    return {"name": name_of(tar), "samples": stats["successes"], "bytes": size,
            "stats": stats, "sample_issues": {}, "problems": problems}


def build_manifest(shard_dir, from_stats: bool = False, processes: int = 1) -> dict:
    """Index every shard in `shard_dir` (a folder or an object-store prefix) into manifest.json
    and sizes.json; return the manifest."""
    from vlp.data_prep.workers import run_tasks

    folder = Folder(shard_dir)
    tars = folder.shards()
    if not tars:
        raise UserError(f"no *.tar shards in {shard_dir}: nothing to index; give the directory "
                        "that holds the NNNNN.tar files (`vlp data download` writes them)")
    shards = run_tasks(shard_from_stats if from_stats else inspect_shard, tars, processes)
    problems = [{"shard": s["name"], **p} for s in shards for p in s["problems"]]
    tar_names = {name_of(tar) for tar in tars}
    for name in folder.names():
        stem = name[: -len("_stats.json")]
        if name.endswith("_stats.json") and f"{stem}.tar" not in tar_names:
            problems.append({"shard": f"{stem}.tar", "kind": "missing_tar", "detail": name})
    totals, errors, issues = Counter(), Counter(), Counter()
    for shard in shards:
        issues.update(shard["sample_issues"])
        if shard["stats"]:
            totals.update({key: shard["stats"][key] for key in (*STATS_COUNTS, "failed")})
            errors.update(shard["stats"]["errors"])
    manifest = {
        "format": FORMAT,
        "counted_from": "stats" if from_stats else "tars",
        "total_shards": len(shards),
        "total_samples": sum(s["samples"] for s in shards),
        "stats_totals": dict(totals),
        "download_errors": dict(errors),
        "sample_issues": dict(issues),
        "problems": problems,
        "shards": shards,
    }
    folder.write_json(MANIFEST, manifest)  # a reader never sees half a manifest
    folder.write_json(SIZES, {s["name"]: s["samples"] for s in shards})
    return manifest
