"""Read webdataset tar shards as samples, streaming, without extracting anything to disk."""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from webdataset.tariterators import base_plus_ext  # webdataset's key rule: name up to first dot

END_OF_ARCHIVE = 1024  # a tar ends with (at least) two zero blocks of 512 bytes


class ShardReadError(Exception):
    """A tar that is truncated or corrupt; the complete samples before the damage were yielded."""


def list_shards(shard_dir) -> list[Path]:
    """The *.tar files directly in `shard_dir`, sorted by name."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"shard directory {shard_dir} does not exist")
    return sorted(shard_dir.glob("*.tar"))


def iter_samples(path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample: consecutive members sharing a key.

    Raises ShardReadError when the tar is damaged; the sample being read at that point is
    dropped, since its remaining members may be lost. A tar cut between members reads as a
    shorter valid one to `tarfile`, so the end-of-archive marker is checked as well.
    """
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                prefix, extension = base_plus_ext(info.name)
                if prefix is None:
                    continue
                data = tar.extractfile(info).read()
                if prefix != key and members:
                    yield key, members
                    members = {}
                key = prefix
                members[extension] = data
            end = tar.offset  # where the member after the last one would start
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read()
        if len(tail) < END_OF_ARCHIVE or tail.strip(b"\0"):
            raise ShardReadError("truncated tar: no end-of-archive marker after the last member")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError(f"truncated, corrupt or unreadable tar: {exc}") from exc
    if members:
        yield key, members
