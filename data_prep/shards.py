"""Read webdataset tar shards as samples, streaming, without extracting anything to disk.

The reading is pipeline.data_tar's, the training loader's own: the index, reshard and tokenizer
see exactly the samples the loader sees (same key rule, same damage checks, same duplicates).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.data_tar import DamagedShard, SkipCounter, read_samples


class ShardReadError(Exception):
    """A tar that is truncated or corrupt; the complete samples before the damage were yielded."""


def list_shards(shard_dir) -> list[Path]:
    """The *.tar files directly in `shard_dir`, sorted by name."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"shard directory {shard_dir} does not exist")
    return sorted(shard_dir.glob("*.tar"))


def iter_samples(path, skipped: SkipCounter | None = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {lower-case extension: bytes}) per sample: adjacent members sharing a key.

    A key seen earlier in the shard, or a member repeated in a sample, is skipped as the loader
    skips it, and counted as "duplicate_key" in `skipped` when given. Raises ShardReadError when
    the tar is damaged (see pipeline.data_tar); the sample being read at that point is dropped,
    since its remaining members may be lost.
    """
    skipped = SkipCounter() if skipped is None else skipped
    try:
        for sample in read_samples(os.fspath(path), None, skipped):
            key = sample.pop("__key__")
            yield key, sample
    except DamagedShard as exc:
        raise ShardReadError(f"{exc.kind}: {exc}") from exc
