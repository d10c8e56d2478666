"""The shard index beside the shards: `manifest.json` (written by `vlp data index`: per shard its
sample count, size, sha256 and img2dataset stats) and OpenCLIP's `sizes.json`.

The loader takes its epoch length and rank/worker split from here, so both must be exact, and
checks the shards against it before training (`check_shards`, `check_hashes`): a shard replaced
since it was indexed would silently change the epoch and break exact resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.sources import local_path, read_beside, url_scheme

MANIFEST = "manifest.json"
SIZES = "sizes.json"
FORMAT = "vlp-shard-manifest/1"


def load_manifest(shard_dir) -> dict:
    """Read manifest.json; a missing or foreign one is an error that says how to make it."""
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{path} does not exist; run `vlp data index {shard_dir}`")
    manifest = _parse_index(path.read_bytes(), path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest; rebuild it with `vlp data index`")
    return manifest


def shard_url_pattern(shard_dir) -> str:
    """A brace pattern naming every shard in the manifest, e.g. DIR/{00000..00031}.tar.

    Works for img2dataset's `00000.tar` and OpenCLIP-style `shard-000000.tar` names; shards
    whose numbering has gaps or mixed prefixes cannot be one pattern and raise ValueError.
    """
    names = sorted(shard["name"] for shard in load_manifest(shard_dir)["shards"])
    if not names:
        raise UserError(f"{shard_dir} has no shards in its manifest")
    if len(names) == 1:
        return f"{Path(shard_dir)}/{names[0]}"
    parts = [re.fullmatch(r"(.*?)(\d+)(\.tar(?:\.gz)?)", name) for name in names]
    if not all(parts) or len({(p[1], p[3], len(p[2])) for p in parts}) != 1:
        raise UserError(f"shard names in {shard_dir} do not share one numbered pattern")
    numbers = [int(p[2]) for p in parts]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise UserError(f"shard numbers in {shard_dir} have gaps; list the shards explicitly")
    prefix, suffix = parts[0][1], parts[0][3]
    return f"{Path(shard_dir)}/{prefix}{{{parts[0][2]}..{parts[-1][2]}}}{suffix}"


def _parse_index(data: bytes, where) -> object:
    """A manifest.json or sizes.json parsed; UserError (how to rebuild it) if it is not JSON, as
    after a copy cut short: guessing the epoch from another file would break exact resume."""
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{where} is not valid JSON ({exc}); rebuild it with "
                        "`vlp data index`") from exc


def _read_json_beside(url: str, name: str):
    """The JSON file `name` in the shard's directory, or None if there is none."""
    data = read_beside(url, name)
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    return None if data is None else _parse_index(data, f"{base}/{name}")


def _shard_entries(url: str, cache: dict) -> dict[str, dict] | None:
    """Shard file name -> its index entry ({"samples", and from a manifest "bytes", "sha256"})
    for the shard's directory (manifest, else sizes.json)."""
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    if base not in cache:
        entries = None
        manifest = _read_json_beside(url, MANIFEST)
        if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
            entries = {os.path.basename(entry["name"]): entry for entry in manifest["shards"]}
        else:
            sizes = _read_json_beside(url, SIZES)
            if isinstance(sizes, dict):
                entries = {os.path.basename(name): {"samples": n} for name, n in sizes.items()}
        cache[base] = entries
    return cache[base]


def count_samples(urls: list[str]) -> dict[str, int]:
    """Samples per shard URL from the manifests; UserError naming what is missing."""
    cache: dict = {}
    counts, missing = {}, []
    for url in urls:
        table = _shard_entries(url, cache)
        name = url.rsplit("/", 1)[-1]
        if table is None or name not in table:
            missing.append(url)
        else:
            counts[url] = int(table[name]["samples"])
    if missing:
        raise UserError(
            f"no sample count for {len(missing)} of {len(urls)} shards (e.g. {missing[0]!r}): "
            "found no manifest.json or sizes.json beside them that lists them. Run `vlp data "
            "index` on the shard directory.")
    return counts


def check_shards(urls: list[str], verify: str) -> None:
    """Compare the size of every local shard with its manifest entry (verify "size" or
    "sha256"); UserError naming the first shard that differs. Shards with no manifest entry
    (OpenCLIP's sizes.json has no sizes), http(s) shards and object storage are not checked."""
    if verify == "none":
        return
    cache: dict = {}
    for url in _local(urls):
        entry = _entry(url, cache)
        if "bytes" in entry and os.path.getsize(local_path(url)) != entry["bytes"]:
            _changed(url, f"has {os.path.getsize(local_path(url))} bytes, the manifest "
                          f"{entry['bytes']}")


def check_hashes(urls: list[str], part: tuple[int, int] = (0, 1)) -> None:
    """Compare the sha256 of `part` = (i, n) of the local shards with their manifest entries
    (verify "sha256": n ranks share the reading); UserError naming the first that differs."""
    cache: dict = {}
    for url in _local(urls)[part[0]::part[1]]:
        entry = _entry(url, cache)
        if "sha256" in entry:
            with open(local_path(url), "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                    _changed(url, "has the manifest's size but not its sha256")


def _local(urls: list[str]) -> list[str]:
    return [url for url in urls if url_scheme(url) in ("", "file")]


def _entry(url: str, cache: dict) -> dict:
    """The shard's manifest entry ({} when there is none)."""
    return (_shard_entries(url, cache) or {}).get(url.rsplit("/", 1)[-1], {})


def _changed(url: str, what: str) -> None:
    raise UserError(
        f"shard {url} {what}: it changed since `vlp data index` recorded it. Restore it, or "
        "re-index the directory (a run resumed on changed shards does not continue "
        "sample-exactly); data.verify=none skips this check.")
