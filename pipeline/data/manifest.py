"""The shard index beside the shards: `manifest.json` (written by `vlp data index`: per shard its
sample count, size, sha256 and img2dataset stats) and OpenCLIP's `sizes.json`.

The loader takes its epoch length and rank/worker split from here, so both must be exact.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.sources import read_beside

MANIFEST = "manifest.json"
SIZES = "sizes.json"
FORMAT = "vlp-shard-manifest/1"


def load_manifest(shard_dir) -> dict:
    """Read manifest.json; a missing or foreign one is an error that says how to make it."""
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{path} does not exist; run `vlp data index {shard_dir}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
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


def _read_json_beside(url: str, name: str):
    """The JSON file `name` in the shard's directory, or None if there is none."""
    data = read_beside(url, name)
    try:
        return None if data is None else json.loads(data)
    except ValueError:  # not JSON
        return None


def _shard_counts(url: str, cache: dict) -> dict[str, int] | None:
    """Shard file name -> sample count for the shard's directory (manifest, else sizes.json)."""
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    if base not in cache:
        counts = None
        manifest = _read_json_beside(url, MANIFEST)
        if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
            counts = {os.path.basename(entry["name"]): int(entry["samples"]) for entry in manifest["shards"]}
        else:
            sizes = _read_json_beside(url, SIZES)
            if isinstance(sizes, dict):
                counts = {os.path.basename(name): int(n) for name, n in sizes.items()}
        cache[base] = counts
    return cache[base]


def count_samples(urls: list[str]) -> dict[str, int]:
    """Samples per shard URL from the manifests; UserError naming what is missing."""
    cache: dict = {}
    counts, missing = {}, []
    for url in urls:
        table = _shard_counts(url, cache)
        name = url.rsplit("/", 1)[-1]
        if table is None or name not in table:
            missing.append(url)
        else:
            counts[url] = table[name]
    if missing:
        raise UserError(
            f"no sample count for {len(missing)} of {len(urls)} shards (e.g. {missing[0]!r}): "
            "found no manifest.json or sizes.json beside them that lists them. Run `vlp data "
            "index` on the shard directory.")
    return counts
