"""Read webdataset tar shards into raw samples: dicts of undecoded bytes grouped by key.

A member `dir/000123.jpg` belongs to sample `dir/000123` (webdataset's rule: the key ends at the
first dot of the file name). A sample's members must be adjacent. Repeats are skipped and counted
as duplicate_key: a key that comes back later in the same shard, and a member name that comes
again inside a sample (the same files written twice in a row), whose first copy is delivered.
Only members whose extension the caller asks for are kept in memory, and only up to
`max_member_bytes` each: a larger member is skipped without being read and drops its sample
(oversized_member), so a small compressed shard cannot claim gigabytes.

Why not `tarfile`: in stream mode it takes a cut-off header or a missing end-of-archive marker
for a normal end, so a truncated shard would pass as complete. This reader checks each header's
checksum and requires the end marker; it understands ustar, pax (`path`, `size`) and GNU long
names, and skips other member types (directories, links, global headers). Header numbers are
checked (digits only, no sign, below MAX_TAR_MEMBER): a bad one ends the shard as corrupt_tar,
and every header moves the reader forward, so a hostile header can neither raise out of the
reader nor make it loop (tests/test_data_tar.py fuzzes it).

Evaluation sets read their images lazily: members whose extension is in `spans` are not read but
yielded as a MemberSpan, the byte range of their data in the (uncompressed) tar.
"""
from __future__ import annotations

import gzip
import http.client
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlp.pipeline.data.errors import BadData
from vlp.pipeline.data.files import require_dir
from vlp.pipeline.data.sources import ReadSettings, open_shard

log = logging.getLogger(__name__)

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR_TYPES = (b"0", b"\0", b"7")
MAX_MEMBER_BYTES = 16 << 20  # default limit on one member kept in memory
MAX_TAR_MEMBER = 1 << 40  # a larger size in a header is taken for corruption
# The most an unseekable stream (http, object storage) reads past to skip one member: a larger
# one ends the shard (oversized_member) instead of downloading up to MAX_TAR_MEMBER bytes.
MAX_STREAM_SKIP = 256 << 20
MAX_HEADER_DATA = 1 << 20  # pax records and GNU long names (a path is < 4 KB)
_META_NAME = re.compile(r"(^|/)__[^/]*__($|/)")  # webdataset's __key__-style metadata members


@dataclass(frozen=True)
class MemberSpan:
    """Where a member's data lies in an uncompressed tar: `size` bytes from byte `offset`."""

    name: str
    offset: int
    size: int


class SkipCounter:
    """Per-worker counts of skipped samples by kind; `paused` while replaying to a position."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.paused = False

    def add(self, kind: str) -> None:
        if not self.paused:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def shard_failed(self, url: str, kind: str, reason: str) -> None:
        if not self.paused:
            log.warning("shard %s: %s (%s); continuing with the next shard", url, reason, kind)
        self.add(kind)


def iter_samples(url: str, wanted: frozenset[str], skipped: SkipCounter,
                 max_member_bytes: int = MAX_MEMBER_BYTES,
                 reading: ReadSettings = ReadSettings()) -> Iterator[dict]:
    """Yield {"__key__": key, ext: bytes, ...} per sample of one shard; never raises for bad data.
    Retried reads from an object store are counted in `skipped` as read_retries."""
    try:
        yield from read_samples(url, wanted, skipped, max_member_bytes=max_member_bytes,
                                reading=reading)
    except BadData as exc:  # the pending sample may be incomplete: it was dropped
        skipped.shard_failed(url, exc.kind, str(exc))


def read_samples(
    url: str, wanted: frozenset[str] | None, skipped: SkipCounter,
    spans: frozenset[str] = frozenset(), max_member_bytes: int = MAX_MEMBER_BYTES,
    keep_oversized: bool = False, reading: ReadSettings = ReadSettings(),
) -> Iterator[dict]:
    """Like `iter_samples`, but a damaged or unreadable shard raises BadData, whose `kind`
    names the skip ("corrupt_tar", "unreadable_shard", "empty_shard"); the sample being read at
    that point is dropped, since its remaining members may be lost. Members with an extension in
    `spans` come as MemberSpan instead of bytes (offsets are only usable in an uncompressed tar)."""
    try:
        stream = open_shard(url, reading, on_retry=lambda: skipped.add("read_retries"))
    except (OSError, http.client.HTTPException) as exc:
        raise BadData("unreadable_shard", f"cannot open: {exc}") from exc
    with stream:
        try:
            members = iter_members(stream, wanted, spans, max_member_bytes)
            yield from group_samples(members, skipped, keep_oversized)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # .tar.gz: truncated or corrupt
            raise BadData("corrupt_tar", f"compressed stream broken: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise BadData("unreadable_shard", f"read failed: {exc}") from exc


def list_shards(shard_dir) -> list[Path]:
    """The *.tar files directly in `shard_dir`, sorted by name."""
    return sorted(require_dir(shard_dir, "shard directory").glob("*.tar"))


def iter_shard(path, skipped: SkipCounter | None = None,
               max_member_bytes: int = MAX_MEMBER_BYTES, keep_oversized: bool = False,
               ) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {lower-case extension: bytes}) per sample of one local shard, every member kept (a
    member over `max_member_bytes`: see group_samples); duplicates are skipped as the loader
    skips them and counted in `skipped`. Raises BadData for a damaged shard (data_prep reports
    it; the loader counts it)."""
    skipped = SkipCounter() if skipped is None else skipped
    for sample in read_samples(os.fspath(path), None, skipped, max_member_bytes=max_member_bytes,
                               keep_oversized=keep_oversized):
        key = sample.pop("__key__")
        yield key, sample


def group_samples(members: Iterator[tuple[str, str, bytes | None]],
                  skipped: SkipCounter, keep_oversized: bool = False) -> Iterator[dict]:
    """Group `iter_members` output into {"__key__": key, ext: bytes, ...}.

    Skipped and counted: a key seen earlier in the shard, the rest of a sample's members from the
    first repeated member name on (the first copy is yielded), both "duplicate_key"; and a sample
    with a member too large to read ("oversized_member"; with `keep_oversized` the sample is
    yielded with None for that member and not counted: the index counts what a tar holds, and
    which samples the loader will skip). Exceptions from `members` propagate;
    the sample pending at that point is not yielded (its members may continue past the damage)
    and counted ("cut_by_damage").
    """
    seen: set[str] = set()
    current_key, group = None, None  # group None: the current key's members are dropped
    try:
        for key, ext, data in members:
            if key != current_key:
                if group is not None:
                    yield group
                current_key = key
                group = None if key in seen else {"__key__": key}
                if group is None:
                    skipped.add("duplicate_key")
                seen.add(key)
            elif group is not None and ext in group:  # the sample's files again: a repeat
                yield group
                group = None
                skipped.add("duplicate_key")
            if group is None:
                continue
            if data is None and not keep_oversized:
                group = None
                skipped.add("oversized_member")
                continue
            group[ext] = data
    except Exception:  # the shard broke: the sample being read is lost with it, counted
        if group is not None:
            skipped.add("cut_by_damage")
        raise
    if group is not None:
        yield group


def iter_members(
    stream, wanted: frozenset[str] | None, spans: frozenset[str] = frozenset(),
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, str, bytes | MemberSpan | None]]:
    """Yield (key, lower-case extension, data) of regular members with an extension in `wanted`
    (every member with a key and an extension when `wanted` is None); for an extension in `spans`
    the data is not read and comes as its MemberSpan; data is None for another member larger
    than `max_member_bytes`, which is skipped unread."""
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            if offset == 0 and not header:
                raise BadData("empty_shard", "file is empty (0 bytes)")
            raise BadData("corrupt_tar", f"truncated: ends at byte {offset + len(header)} "
                                              "without the end-of-archive marker")
        if header == ZERO_BLOCK:
            return
        _check_header(header, offset)
        name = long_name or pax.get("path") or _ustar_name(header)
        size = _pax_size(pax["size"], offset) if "size" in pax else _number(header[124:136], offset)
        if size > MAX_TAR_MEMBER:
            raise BadData("corrupt_tar", f"implausible member size {size} at byte {offset}")
        long_name, pax = None, {}
        kind = header[156:157]
        offset += BLOCK
        padding = -size % BLOCK
        if kind in REGULAR_TYPES:
            key, ext = _split_name(name)
            if key is not None and ext in spans:
                _skip(stream, size + padding, offset)
                yield key, ext, MemberSpan(name, offset, size)
            elif key is None or (wanted is not None and ext not in wanted):
                _skip(stream, size + padding, offset)
            elif size > max_member_bytes:
                if size > MAX_STREAM_SKIP and not _seeks_cheaply(stream):
                    raise BadData("oversized_member", f"{name} is {size} bytes at byte {offset}: "
                                  "too large to read past on a stream; the rest is skipped")
                _skip(stream, size + padding, offset)
                yield key, ext, None
            else:
                data = _read_exact(stream, size, offset)
                _skip(stream, padding, offset + size)
                yield key, ext, data
        elif kind == b"L":  # GNU long name: the data is the next member's name
            name_bytes = _read_header_data(stream, size, offset)
            long_name = name_bytes.rstrip(b"\0").decode("utf-8", "surrogateescape")
            _skip(stream, padding, offset + size)
        elif kind == b"x":  # pax extended header for the next member
            pax = _parse_pax(_read_header_data(stream, size, offset), offset)
            _skip(stream, padding, offset + size)
        else:
            _skip(stream, size + padding, offset)
        offset += size + padding


def _split_name(name: str) -> tuple[str | None, str]:
    if _META_NAME.search(name):
        return None, ""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no extension, or a hidden file
        return None, ""
    return name[:dot], name[dot + 1:].lower()


def _check_header(header: bytes, offset: int) -> None:
    stored = _number(header[148:156], offset)
    field = sum(header[148:156]) - 8 * 32  # the checksum is summed with its field as spaces
    if stored != int(np.frombuffer(header, dtype=np.uint8).sum()) - field:
        signed = np.frombuffer(header, dtype=np.int8)  # some old writers summed signed bytes
        if stored != int(signed.sum()) - int(signed[148:156].sum()) + 8 * 32:
            raise BadData("corrupt_tar", f"bad header checksum at byte {offset}")


def _number(field: bytes, offset: int) -> int:
    if field[0] & 0x80:  # GNU base-256 for large values
        if field[0] & 0x40:
            raise BadData("corrupt_tar", f"negative number in header at byte {offset}")
        return int.from_bytes(bytes([field[0] & 0x3F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if text.strip(b"01234567"):  # int() would also take a sign, "_" and "0o"
        raise BadData("corrupt_tar", f"malformed header at byte {offset}")
    return int(text, 8) if text else 0


def _pax_size(value: str, offset: int) -> int:
    if not (value.isascii() and value.isdigit()):
        raise BadData("corrupt_tar", f"malformed pax size {value[:30]!r} at byte {offset}")
    return int(value)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, offset: int) -> dict[str, str]:
    """Records are `LENGTH KEY=VALUE\\n`, LENGTH counting the whole record."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise BadData("corrupt_tar", f"malformed pax header at byte {offset}") from None
        if space < 0 or length <= 0:
            raise BadData("corrupt_tar", f"malformed pax header at byte {offset}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _read_header_data(stream, size: int, offset: int) -> bytes:
    if size > MAX_HEADER_DATA:
        raise BadData("corrupt_tar", f"implausible {size}-byte extended header at byte {offset}")
    return _read_exact(stream, size, offset)


def _read_exact(stream, size: int, offset: int) -> bytes:
    data = stream.read(size)
    if len(data) == size:
        return data
    buffer = bytearray(data)  # raw streams (sockets) may return short reads before the end
    while len(buffer) < size and (chunk := stream.read(size - len(buffer))):
        buffer += chunk
    if len(buffer) < size:
        raise BadData("corrupt_tar", f"truncated: member data at byte {offset} ends after "
                                          f"{len(buffer)} of {size} bytes")
    return bytes(buffer)


def _seeks_cheaply(stream) -> bool:
    """A gzip stream is "seekable" by decompressing everything in between."""
    return stream.seekable() and not isinstance(stream, gzip.GzipFile)


def _skip(stream, size: int, offset: int) -> None:
    if size == 0:
        return
    if stream.seekable():  # seeking past the end shows up as a short header read next
        stream.seek(size, 1)
        return
    for start in range(0, size, 1 << 20):
        _read_exact(stream, min(1 << 20, size - start), offset + start)
