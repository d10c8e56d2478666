"""Read a URL list (parquet, csv, tsv) and keep only rows img2dataset should fetch.

Dropped and counted: URLs that are not http(s), hosts on private/loopback/link-local/reserved
addresses (unless allowed; literal IPs in any notation, and "localhost"; DNS names are not
resolved here), unparsable URLs, and captions that are missing, empty or not UTF-8. img2dataset
would write such captions as they are (a bytes caption even as its Python repr), and the training
loader would skip those samples anyway, so their images are not worth downloading.
"""
from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.transforms import decode_caption

FORMATS = {".parquet": None, ".csv": ",", ".tsv": "\t"}
EXAMPLES_PER_KIND = 3


def read_url_list(path, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Read the url and caption columns; a missing column is an error that names it."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise UserError(f"URL list {path}: unsupported format; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise UserError(f"URL list {path} not found")
    if path.suffix == ".parquet":
        columns = pq.read_schema(path).names
    else:
        # Read the url and caption columns as bytes: captions are decoded (and checked) below.
        types = {url_col: pa.binary(), caption_col: pa.binary()}
        options = pa_csv.ConvertOptions(column_types=types)
        parse = pa_csv.ParseOptions(delimiter=FORMATS[path.suffix])
        table = pa_csv.read_csv(path, parse_options=parse, convert_options=options)
        columns = table.column_names
    for column, flag in ((url_col, "--url-col"), (caption_col, "--caption-col")):
        if column not in columns:
            raise UserError(
                f"URL list {path} has no column {column!r} (it has {columns}); "
                f"name the right one with {flag}"
            )
    if path.suffix == ".parquet":
        table = pq.read_table(path, columns=[url_col, caption_col])
    return table.select([url_col, caption_col])


def _as_text(value) -> str | None:
    """A URL cell as text; None (counted as invalid_url) when it is not UTF-8 text."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _ip(host: str):
    """The address a literal host names (also legacy forms such as 127.1), else None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def url_problem(url: str | None, allow_private_hosts: bool) -> str | None:
    """Why `url` must not be fetched ('invalid_url', 'bad_scheme', 'private_host'), or None."""
    if not url:
        return "invalid_url"
    try:
        parts = urlsplit(url.strip())
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError:
        return "invalid_url"
    if parts.scheme.lower() not in ("http", "https"):
        return "bad_scheme"
    if not host:
        return "invalid_url"
    if allow_private_hosts:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return "private_host"
    ip = _ip(host)
    if ip is not None and (not ip.is_global or ip.is_multicast):
        return "private_host"
    return None


def clean_caption(value) -> tuple[str | None, str | None]:
    """(stripped caption, None), or (None, why the training loader would skip it)."""
    data = value if value is None or isinstance(value, bytes) else str(value).encode("utf-8")
    try:
        return decode_caption(data), None
    except BadData as bad:
        return None, bad.kind


def sanitize(table: pa.Table, allow_private_hosts: bool) -> tuple[pd.DataFrame, dict]:
    """Keep the fetchable rows as a (url, caption) frame; count every dropped row by reason."""
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    urls, captions = [], []
    for raw_url, raw_caption in zip(*(column.to_pylist() for column in table.columns)):
        url = _as_text(raw_url)
        problem = url_problem(url, allow_private_hosts)
        if problem is None:
            caption, problem = clean_caption(raw_caption)
        if problem is None:
            urls.append(url.strip())
            captions.append(caption)
            continue
        counts[problem] += 1
        shown = examples.setdefault(problem, [])
        if len(shown) < EXAMPLES_PER_KIND:
            shown.append(repr(url if url is not None else raw_url)[:200])
    report = {
        "rows": table.num_rows, "kept": len(urls), "dropped": dict(counts), "examples": examples,
    }  # fmt: skip
    return pd.DataFrame({"url": urls, "caption": captions}), report
