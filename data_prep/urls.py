"""Read a URL list (parquet, csv, tsv) and keep only rows img2dataset should fetch.

Dropped and counted: URLs that are not http(s) (bad_scheme); unparsable URLs and hosts that are
not a plain host name, a dotted IPv4 address or a bracketed IPv6 address (invalid_url); hosts on
private, loopback, link-local or reserved addresses (private_host, unless allowed): literal IPs in
any notation (IPv4 inside IPv6 too), "localhost", and host names that resolve to such an address
now; and captions that are missing, empty or not UTF-8. The host is checked as the fetcher will
use it: percent-escapes decoded (`%31%32%37.0.0.1` is 127.0.0.1) and IDNA-encoded. img2dataset
would write bad captions as they are (a bytes caption even as its Python repr), and the training
loader would skip those samples anyway, so their images are not worth downloading.

This is the first gate; data_prep.fetch applies it again at fetch time, to every redirect hop and
to the address actually connected to (a name may resolve elsewhere by then: DNS rebinding).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.transforms import decode_caption

FORMATS = {".parquet": None, ".csv": ",", ".tsv": "\t"}
EXAMPLES_PER_KIND = 3
DNS_THREADS = 32
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_DOTTED_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def read_url_list(path, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Read the url and caption columns; a missing column is an error that names it."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise UserError(f"URL list {path}: unsupported format; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise UserError(f"URL list {path} not found")
    try:
        if path.suffix == ".parquet":
            columns = pq.read_schema(path).names
        else:
            # Read the url and caption columns as bytes: captions are decoded (and checked) below.
            types = {url_col: pa.binary(), caption_col: pa.binary()}
            options = pa_csv.ConvertOptions(column_types=types)
            parse = pa_csv.ParseOptions(delimiter=FORMATS[path.suffix])
            table = pa_csv.read_csv(path, parse_options=parse, convert_options=options)
            columns = table.column_names
    except pa.ArrowInvalid as exc:  # not parquet (e.g. a text file so named), or a broken csv
        raise UserError(f"URL list {path} cannot be read as {path.suffix[1:]}: {exc}") from exc
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
        return ipaddress.ip_address(host)
    except ValueError:
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):  # ValueError: a NUL in the name
            return None


def is_private_address(ip) -> bool:
    """Not a public unicast address, also when IPv6 carries an IPv4 address (mapped, 6to4,
    NAT64, IPv4-compatible) that is not."""
    if not ip.is_global or ip.is_multicast:
        return True
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (ip in _NAT64 or ip in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return embedded is not None and is_private_address(embedded)
    return False


def _host(parts: SplitResult) -> tuple[str | None, bool]:
    """(the host as the fetcher uses it, whether it is written as a plain name, a dotted IPv4 or
    a bracketed IPv6 address). Percent-escapes are decoded, names IDNA-encoded and lower-cased,
    one trailing dot dropped. (None, False) when there is no host or it cannot be decoded."""
    if not parts.hostname:
        return None, False
    try:
        host = unquote(parts.hostname, errors="strict")
    except UnicodeDecodeError:
        return None, False
    if parts.netloc.rpartition("@")[2].startswith("["):
        return host, isinstance(_ip(host), ipaddress.IPv6Address)
    try:
        host = host.removesuffix(".").encode("idna").decode("ascii").lower()
    except UnicodeError:  # an empty or over-long label
        return None, False
    if _DOTTED_IPV4.fullmatch(host):
        return host, isinstance(_ip(host), ipaddress.IPv4Address) and host == str(_ip(host))
    labels = host.split(".")
    plain = (len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)
             and not labels[-1].isdigit())  # 2130706433 is an address, not a name
    return host, plain


def resolve_uncached(host: str) -> tuple:
    """The addresses `host` resolves to now; empty when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return ()
    return tuple({ipaddress.ip_address(info[4][0].partition("%")[0]) for info in infos})


resolve = functools.lru_cache(maxsize=1 << 16)(resolve_uncached)  # sanitizing: one lookup a host


def _check(url: str | None, allow_private_hosts: bool) -> tuple[str | None, str | None]:
    """(problem, None), or (None, a host name still to resolve and check), or (None, None)."""
    if not url:
        return "invalid_url", None
    try:
        parts = urlsplit(url.strip())
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        return "invalid_url", None
    if parts.scheme.lower() not in ("http", "https"):
        return "bad_scheme", None
    host, plain = _host(parts)
    if host is None:
        return "invalid_url", None
    ip = _ip(host)
    if not allow_private_hosts and ip is not None and is_private_address(ip):
        return "private_host", None  # also when written in a legacy form such as 127.1
    if not plain:
        return "invalid_url", None
    if allow_private_hosts or ip is not None:
        return None, None
    if host == "localhost" or host.endswith(".localhost"):
        return "private_host", None
    return None, host


def url_problem(url: str | None, allow_private_hosts: bool) -> str | None:
    """Why `url` must not be fetched ('invalid_url', 'bad_scheme', 'private_host'), or None."""
    problem, host = _check(url, allow_private_hosts)
    if host is not None and any(is_private_address(ip) for ip in resolve(host)):
        return "private_host"
    return problem


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
    rows = list(zip(*(column.to_pylist() for column in table.columns)))
    hosts = {_check(_as_text(raw_url), allow_private_hosts)[1] for raw_url, _ in rows} - {None}
    with ThreadPoolExecutor(DNS_THREADS) as pool:  # each name once, many lookups in flight
        list(pool.map(resolve, hosts))
    for raw_url, raw_caption in rows:
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
