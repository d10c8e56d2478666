"""Merge or split shards into shards of exactly K samples (the last one may hold fewer), from and
to a local folder or an object-store prefix (s3://bucket/shards, through fsspec).

Streaming: samples are read from the input tars and written to the new ones member by member,
each sample's members kept together and in order; nothing is extracted to disk. Each new shard
gets a NNNNN_stats.json with its sample count (count == successes; "resharded_from" names its
sources), so the index can check the new tars the same way it checks img2dataset's. The shards
are written into OUT/.partial and moved into OUT only when all are written, so a reshard cut
short (a kill, a full disk) leaves no shards that look like a complete dataset.
"""
from __future__ import annotations

import webdataset as wds

from vlp.data_prep.folder import Folder, name_of
from vlp.data_prep.index import build_manifest
from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.tar import SkipCounter, iter_shard
from vlp.pipeline.progress import tracked


class ShardWriter:
    """Writes samples to OUT/00000.tar, 00001.tar, ... starting a new tar every K samples."""

    def __init__(self, out: Folder, samples_per_shard: int):
        self.out, self.samples_per_shard = out, samples_per_shard
        self.shards_written = 0
        self.stream, self.writer, self.samples, self.sources = None, None, 0, []

    def write(self, key: str, members: dict[str, bytes], source: str) -> None:
        if self.writer is None:
            self.stream = self.out.fs.open(f"{self.out.path}/{self.shards_written:05d}.tar", "wb")
            self.writer = wds.TarWriter(self.stream, encoder=False, keep_meta=True)
        self.writer.write({"__key__": key, **members})
        self.samples += 1
        if source not in self.sources:
            self.sources.append(source)
        if self.samples == self.samples_per_shard:
            self.close()

    def close(self) -> None:
        """Finish the open tar and write its stats."""
        if self.writer is None:
            return
        self.writer.close()
        self.stream.close()  # in an object store, the upload completes here
        stats = {
            "count": self.samples,
            "successes": self.samples,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": self.samples},
            "resharded_from": self.sources,
        }
        self.out.write_json(f"{self.shards_written:05d}_stats.json", stats)
        self.shards_written += 1
        self.stream, self.writer, self.samples, self.sources = None, None, 0, []


STAGING = ".partial"
# Members are copied whole, whatever the loader's limit (data.max_member_mb) will be; a sample
# with a larger member is dropped and counted (oversized_member).
MAX_COPIED_MEMBER = 1 << 30


def _publish(staging: Folder, out: Folder) -> None:
    """Move the finished shards into `out`: tars first, then their stats (a kill in between
    leaves tars the index reports as missing their stats), then drop the staging folder. In an
    object store a move is a copy and a delete."""
    names = staging.names()
    for suffix in (".tar", "_stats.json"):
        for name in (n for n in names if n.endswith(suffix)):
            out.fs.mv(f"{staging.path}/{name}", f"{out.path}/{name}")
    out.delete([STAGING], recursive=True)


def unsafe_key(key: str) -> bool:
    """A key that, as a member name, would extract outside the folder (`tar -x`): absolute, or
    with a `..` part."""
    parts = key.replace("\\", "/").split("/")
    return key.startswith(("/", "\\")) or ".." in parts


def reshard(in_dir, out_dir, samples_per_shard: int) -> dict:
    """Rewrite the shards of `in_dir` into `out_dir` with `samples_per_shard` samples each, index
    `out_dir`, and return the summary. Samples of a damaged input tar that precede the damage are
    kept; the tar is listed under `corrupt_inputs`. Repeated keys are dropped as the loader drops
    them and counted under `duplicate_keys_dropped`; keys whose member names would extract outside
    a folder (`../x`, `/x`) are not copied, counted under `unsafe_names_dropped`.
    """
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    tars = Folder(in_dir).shards()
    if not tars:
        raise UserError(f"no *.tar shards in {in_dir}")
    out = Folder(out_dir)
    out.check_bucket()
    if any(name.endswith(".tar") for name in out.names()):  # also refuses out == in_dir
        raise UserError(f"{out} already holds shards; choose an empty output directory")
    out.delete([STAGING], recursive=True)  # what a reshard cut short left
    staging = Folder(out.url(STAGING))
    staging.fs.makedirs(staging.path, exist_ok=True)
    sink = ShardWriter(staging, samples_per_shard)
    samples_read, unsafe, corrupt, skipped = 0, 0, [], SkipCounter()
    try:
        for tar in tracked(tars, "reshard", "shard"):
            try:
                for key, members in iter_shard(tar, skipped, MAX_COPIED_MEMBER):
                    samples_read += 1
                    if unsafe_key(key):
                        unsafe += 1
                        continue
                    sink.write(key, members, name_of(tar))
            except BadData as exc:
                corrupt.append({"shard": name_of(tar), "detail": f"{exc.kind}: {exc}"})
        sink.close()
    except OSError as exc:  # a full disk, a read-only folder: nothing is published
        raise UserError(f"reshard into {out} failed: {exc}; no shard was published") from exc
    _publish(staging, out)
    manifest = build_manifest(out.location)
    return {
        "input_shards": len(tars),
        "samples_read": samples_read,
        "corrupt_inputs": corrupt,
        "duplicate_keys_dropped": skipped.counts.get("duplicate_key", 0),
        "oversized_samples_dropped": skipped.counts.get("oversized_member", 0),
        "unsafe_names_dropped": unsafe,
        "output_shards": manifest["total_shards"],
        "total_samples": manifest["total_samples"],
        "sample_issues": manifest["sample_issues"],
        "problems": manifest["problems"],
    }
