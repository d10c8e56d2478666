"""Shards, the files beside them and evaluation shards in object storage (`s3://`, `gs://`, ...),
through fsspec.

Reads are streamed: a shard is read front to back in ranged requests of `buffer` bytes, and
nothing is copied to local disk. Credentials come from each store's standard chain, never from
vlp's config: for S3 the AWS_* environment variables, a profile in ~/.aws, or the instance role;
AWS_ENDPOINT_URL points at an S3-compatible store (MinIO, Ceph, a local test server). Errors name
the URL and the store's message, never a credential.

The package behind each scheme is an optional extra: `pip install 'vlp[s3]'` for s3://.
"""
from __future__ import annotations

import urllib.parse

from vlp.pipeline.data.errors import UserError

# scheme -> the fsspec implementation's package
OBJECT_STORES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                 "abfs": "adlfs", "abfss": "adlfs"}


def is_object_url(url: str) -> bool:
    return urllib.parse.urlparse(url).scheme.lower() in OBJECT_STORES


def _filesystem(url: str):
    """(fsspec filesystem, path) for `url`; a missing implementation is a UserError."""
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


class _StreamedObject:
    """A read-only stream over one object whose request errors are OSErrors."""

    def __init__(self, url: str, file):
        self.url, self.file = url, file

    def read(self, size: int = -1) -> bytes:
        try:
            return self.file.read(size)
        except Exception as exc:
            raise _as_os_error(self.url, exc) from exc

    def seekable(self) -> bool:
        return False  # read front to back: skipped members are read past, within the readahead

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_object(url: str, buffer: int) -> _StreamedObject:
    """A binary stream of the object, fetched in sequential ranged reads of `buffer` bytes."""
    fs, path = _filesystem(url)
    try:
        return _StreamedObject(url, fs.open(path, "rb", block_size=buffer,
                                            cache_type="readahead"))
    except Exception as exc:
        raise _as_os_error(url, exc) from exc


def read_range(url: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (one ranged request; size -1: to the end)."""
    fs, path = _filesystem(url)
    try:
        return fs.cat_file(path, start=offset, end=None if size < 0 else offset + size)
    except Exception as exc:
        raise _as_os_error(url, exc) from exc


def read_object(url: str) -> bytes | None:
    """The whole object (a manifest, a JSON file), or None when it does not exist."""
    fs, path = _filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _as_os_error(url, exc) from exc


def check_reachable(url: str) -> None:
    """One request up front, so that a wrong endpoint, bucket or credential is one clear error
    before a job starts, not a run in which every shard is skipped as unreadable."""
    fs, path = _filesystem(url)
    try:
        fs.info(path)
    except FileNotFoundError:
        raise UserError(f"shard {url!r} does not exist in the store; check data.shards") from None
    except Exception as exc:
        raise UserError(f"cannot read {url!r}: {type(exc).__name__}: {exc}. Check the network, "
                        "the endpoint (AWS_ENDPOINT_URL for S3-compatible stores) and the "
                        "credentials in the environment or profile.") from None
