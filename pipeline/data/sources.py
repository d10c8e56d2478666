"""Shard URLs: expand, validate, open, and read the files beside them.

Accepted: local paths, `file://` and `http(s)://` URLs, and object storage (`s3://`, `gs://`, ...:
object_store.py). `pipe:` URLs are refused: a shard list that runs shell commands turns a config
file into code execution.
"""
from __future__ import annotations

import collections
import gzip
import io
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from webdataset.shardlists import expand_urls

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.object_store import (
    OBJECT_STORES,
    check_reachable,
    is_object_url,
    open_object,
    read_object,
)

REMOTE_SCHEMES = ("http", "https")
HTTP_TIMEOUT_S = 60
# An http(s) shard arriving slower than this on average, once RATE_GRACE_S have passed, is given
# up (unreadable_shard): the per-read timeout alone lets one byte every few seconds hold a reader,
# and every rank waiting on it, until the distributed timeout.
MIN_BYTES_PER_S = 64 << 10
RATE_GRACE_S = HTTP_TIMEOUT_S


class RateGuardedResponse(io.RawIOBase):
    """An HTTP response body as a raw stream that raises OSError once it arrives slower than
    MIN_BYTES_PER_S on average after RATE_GRACE_S."""

    def __init__(self, response):
        self.response = response
        self.started, self.received = time.monotonic(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.response.read1(len(buffer))  # what has arrived: the check runs as it trickles
        buffer[:len(data)] = data
        self.received += len(data)
        elapsed = time.monotonic() - self.started
        if elapsed > RATE_GRACE_S and self.received < MIN_BYTES_PER_S * elapsed:
            raise OSError(f"{self.received} bytes in {elapsed:.0f} s: slower than the minimum "
                          f"{MIN_BYTES_PER_S} bytes/s")
        return len(data)

    def close(self) -> None:
        self.response.close()
        super().close()


@dataclass(frozen=True)
class ReadSettings:
    """How a shard is read: `buffer_bytes` per read (a ranged request in an object store, the
    buffer of an http(s) or local stream); in an object store `concurrency` ranged reads in
    flight and `retries` more tries of a failed one (object_store.RangedObject)."""

    buffer_bytes: int = 1 << 20
    concurrency: int = 1
    retries: int = 0


@dataclass(frozen=True)
class Sources:
    """The expanded shard URLs of each `::`-separated source, in the order given."""

    urls: tuple[tuple[str, ...], ...]

    @property
    def all_urls(self) -> list[str]:
        return [url for source in self.urls for url in source]


def parse_sources(shards: str) -> Sources:
    """Split `a/{000..009}.tar::b/{00..99}.tar` into sources and brace-expand each one."""
    if not shards or not shards.strip():
        raise UserError(
            "no training shards given: set data.shards to e.g. 'shards/{00000..00099}.tar'")
    sources = []
    for pattern in shards.split("::"):
        urls = tuple(url.strip() for url in expand_urls(pattern.strip()) if url.strip())
        if not urls:
            raise UserError(f"shard pattern {pattern!r} in {shards!r} expands to no URLs")
        for url in urls:
            check_url(url)
        if is_object_url(urls[0]):
            check_reachable(urls[0])
        sources.append(urls)
    counts = collections.Counter(url for source in sources for url in source)
    duplicates = sorted(url for url, n in counts.items() if n > 1)
    if duplicates:
        raise UserError(f"shard(s) listed more than once: {duplicates[:5]}; each epoch would "
                         "repeat their samples. Remove the overlap from the shard patterns.")
    return Sources(tuple(sources))


def check_url(url: str) -> None:
    """Refuse `pipe:` and schemes we cannot read; a local shard must exist."""
    scheme = url_scheme(url)
    if scheme == "pipe":
        raise UserError(f"refusing shard URL {url!r}: pipe: URLs run shell commands. Download the "
                         "shards, or serve them over http(s) and list those URLs.")
    if scheme in REMOTE_SCHEMES or scheme in OBJECT_STORES:
        return
    if scheme not in ("", "file"):
        raise UserError(f"unsupported shard URL {url!r}: use a local path, file://, http(s)://, "
                        f"or an object store ({', '.join(s + '://' for s in OBJECT_STORES)}).")
    path = local_path(url)
    if any(char in path for char in "*?[") and not os.path.isfile(path):
        raise UserError(f"shard {url!r}: wildcards are not expanded; list shards with a brace "
                        "pattern such as 'shards/{00000..00011}.tar' (one number range, "
                        "zero-padded like the file names)")
    if os.path.isdir(path):
        raise UserError(f"shard {url!r} is a directory; name its tar files with a brace pattern "
                        "such as 'shards/{00000..00011}.tar'")
    if not os.path.isfile(path):
        raise UserError(f"shard {url!r} does not exist (looked for {os.path.abspath(path)}); "
                         "check data.shards or run `vlp data download`.")


def check_not_all_empty(urls: list[str]) -> None:
    """Zero-byte shards are skipped and counted while training, but not when they are all."""
    local = [url for url in urls if url_scheme(url) in ("", "file")]
    if local and len(local) == len(urls) and all(os.path.getsize(local_path(u)) == 0 for u in local):
        raise UserError(f"all {len(urls)} shards are empty (0 bytes), e.g. {urls[0]!r}; "
                         "the download wrote nothing. Re-run `vlp data download`.")


def local_path(url: str) -> str:
    return urllib.parse.urlparse(url).path if url.startswith("file://") else url


def url_scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urllib.parse.urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme.lower()  # "C:" is a drive letter, not a scheme


def open_shard(url: str, reading: ReadSettings = ReadSettings(),
               on_retry: Callable[[], None] = lambda: None):
    """A binary stream of the shard's tar bytes (gunzipped for .tar.gz / .tgz); `on_retry()` for
    each retried ranged read from an object store."""
    buffer = reading.buffer_bytes
    if url_scheme(url) in REMOTE_SCHEMES:
        response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        stream = io.BufferedReader(RateGuardedResponse(response), buffer)
    elif is_object_url(url):
        stream = open_object(url, buffer, reading.concurrency, reading.retries, on_retry)
    else:
        stream = open(local_path(url), "rb", buffering=buffer)
    if url.endswith((".gz", ".tgz")):
        return GunzippedStream(stream)
    return stream


class GunzippedStream(gzip.GzipFile):
    """The gunzipped bytes of `source`, which it closes when closed (a GzipFile given a file
    object leaves it open: every .tar.gz shard read would hold its file until collected)."""

    def __init__(self, source):
        super().__init__(fileobj=source, mode="rb")
        self.source = source

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.source.close()


def read_beside(url: str, name: str) -> bytes | None:
    """The bytes of file `name` in the shard's directory, or None if there is none."""
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    target = f"{base}/{name}"
    try:
        if url_scheme(url) in REMOTE_SCHEMES:
            with urllib.request.urlopen(target, timeout=HTTP_TIMEOUT_S) as response:
                return response.read()
        if is_object_url(url):
            return read_object(target)
        path = local_path(target)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # no such file, not served
        return None
