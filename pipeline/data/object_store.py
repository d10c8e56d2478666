"""Shards, the files beside them and evaluation shards in object storage (`s3://`, `gs://`, ...),
through fsspec.

Reads are streamed: a shard is read front to back in ranged requests of `data.read_buffer_mb`,
`data.read_concurrency` of them in flight, each failed one retried `data.read_retries` times with
backoff (counted), and nothing is copied to local disk. The request rate a job puts on the store
is its read throughput / the buffer size, so a larger buffer keeps a large job under the store's
limit (S3: 5,500 GETs/s per prefix). Credentials come from each store's standard chain, never from
vlp's config: for S3 the AWS_* environment variables, a profile in ~/.aws, or the instance role;
AWS_ENDPOINT_URL points at an S3-compatible store (MinIO, Ceph, a local test server). Errors name
the URL and the store's message, never a credential.

The package behind each scheme is an optional extra: `pip install 'vlp[s3]'` for s3://.
"""
from __future__ import annotations

import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from vlp.pipeline.data.errors import UserError

RETRY_BACKOFF_S = 0.5  # before the first retry of a ranged read; doubles for each next one

# scheme -> the fsspec implementation's package
OBJECT_STORES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                 "abfs": "adlfs", "abfss": "adlfs"}


def is_object_url(url: str) -> bool:
    return urllib.parse.urlparse(url).scheme.lower() in OBJECT_STORES


def filesystem(url: str):
    """(fsspec filesystem, path) for `url` (a local path too); a missing implementation is a
    UserError."""
    from fsspec.core import url_to_fs

    scheme = urllib.parse.urlparse(url).scheme.lower()
    try:
        return url_to_fs(url)
    except ImportError as exc:
        package = OBJECT_STORES[scheme]
        raise UserError(f"{url}: reading {scheme}:// needs the {package} package "
                        f"(pip install {package}; for s3:// `pip install 'vlp[s3]'`)") from exc


class StoreError(OSError):
    """A store request that failed (unreachable endpoint, denied, throttled): an OSError, so the
    shard reader counts the shard as unreadable and continues, as it does for local files."""


def _as_os_error(url: str, exc: Exception) -> OSError:
    if isinstance(exc, OSError):
        return exc
    return StoreError(f"{url}: {type(exc).__name__}: {exc}")


class RangedObject:
    """A read-only stream over one object of `size` bytes, fetched front to back in ranged reads
    of `block` bytes, `concurrency` of them in flight; a failed read is tried again `retries`
    times (RETRY_BACKOFF_S, doubling), `on_retry()` called for each, then raises OSError."""

    def __init__(self, url: str, size: int, block: int, concurrency: int, retries: int,
                 on_retry: Callable[[], None]):
        self.url, self.size, self.block = url, size, block
        self.concurrency, self.retries, self.on_retry = concurrency, retries, on_retry
        self.pool = ThreadPoolExecutor(concurrency) if concurrency > 1 else None
        self.pending: deque = deque()
        self.requested = 0  # bytes asked for so far
        self.data, self.at = b"", 0  # the current block and the position in it
        self.retried = 0  # retries not yet reported (the fetching threads add to it)
        self.lock = threading.Lock()

    def read(self, size: int = -1) -> bytes:
        parts = []
        while size != 0:
            if self.at == len(self.data):
                self.data, self.at = self._next_block(), 0
                if not self.data:
                    break
            part = self.data[self.at:len(self.data) if size < 0 else self.at + size]
            self.at += len(part)
            size = size - len(part) if size > 0 else size
            parts.append(part)
        return b"".join(parts)

    def _next_block(self) -> bytes:
        while len(self.pending) < self.concurrency and self.requested < self.size:
            n = min(self.block, self.size - self.requested)
            offset, self.requested = self.requested, self.requested + n
            self.pending.append(self.pool.submit(self._fetch, offset, n) if self.pool
                                else (offset, n))
        if not self.pending:
            return b""
        head = self.pending.popleft()
        try:
            return head.result() if self.pool else self._fetch(*head)
        finally:
            self._report_retries()

    def _report_retries(self) -> None:
        with self.lock:
            retried, self.retried = self.retried, 0
        for _ in range(retried):
            self.on_retry()

    def _fetch(self, offset: int, n: int) -> bytes:
        attempt = 0
        while True:
            try:
                data = read_range(self.url, offset, n)
                if len(data) == n:
                    return data
                error: OSError = StoreError(f"{self.url}: {len(data)} bytes at {offset}, "
                                            f"asked for {n}")
            except OSError as exc:
                error = exc
            if attempt == self.retries:
                raise error
            with self.lock:
                self.retried += 1
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
            attempt += 1

    def seekable(self) -> bool:
        return False  # read front to back: skipped members are read past, within the readahead

    def close(self) -> None:
        """Drop the reads not yet started; wait for those under way, so that the retries they
        made are counted too."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self._report_retries()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_object(url: str, block: int, concurrency: int = 1, retries: int = 0,
                on_retry: Callable[[], None] = lambda: None) -> RangedObject:
    """A binary stream of the object in ranged reads (RangedObject); one request for its size."""
    fs, path = filesystem(url)
    try:
        size = fs.info(path)["size"]
    except Exception as exc:
        raise _as_os_error(url, exc) from exc
    return RangedObject(url, size, block, concurrency, retries, on_retry)


def read_range(url: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (one ranged request; size -1: to the end)."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path, start=offset, end=None if size < 0 else offset + size)
    except Exception as exc:
        raise _as_os_error(url, exc) from exc


def read_object(url: str) -> bytes | None:
    """The whole object (a manifest, a JSON file), or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _as_os_error(url, exc) from exc


def check_reachable(url: str) -> None:
    """One request up front, so that a wrong endpoint, bucket or credential is one clear error
    before a job starts, not a run in which every shard is skipped as unreadable."""
    fs, path = filesystem(url)
    try:
        fs.info(path)
    except FileNotFoundError:
        raise UserError(f"shard {url!r} does not exist in the store; check data.shards") from None
    except Exception as exc:
        raise UserError(f"cannot read {url!r}: {type(exc).__name__}: {exc}. Check the network, "
                        "the endpoint (AWS_ENDPOINT_URL for S3-compatible stores) and the "
                        "credentials in the environment or profile.") from None
