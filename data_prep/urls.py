"""Keep only the URLs img2dataset should fetch, and the captions the training loader can use.

Refused and counted: URLs that are not http(s) (bad_scheme); unparsable URLs and hosts that are
not a plain host name, a dotted IPv4 address or a bracketed IPv6 address (invalid_url); hosts on
private, loopback, link-local or reserved addresses (private_host, unless allowed): literal IPs in
any notation (IPv4 inside IPv6 too), "localhost", and host names that resolve to such an address
now; and captions that are missing, empty or not UTF-8. The host is checked as the fetcher will
use it: percent-escapes decoded (`%31%32%37.0.0.1` is 127.0.0.1) and IDNA-encoded. img2dataset
would write bad captions as they are (a bytes caption even as its Python repr), and the training
loader would skip those samples anyway, so their images are not worth downloading.

`check_batch` does this for a batch of rows at once: URLs of the common form (http(s), an ASCII
host name, printable ASCII after it) are checked with vectorised pattern matches, the others one
by one with `url_problem`, and each distinct host name is looked up once, concurrently.

This is the first gate; data_prep.fetch applies it again at fetch time, to every redirect hop and
to the address actually connected to (a name may resolve elsewhere by then: DNS rebinding).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
from concurrent.futures import Executor
from urllib.parse import SplitResult, unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Why a row is refused; a row's code is 1 + the index of its reason here, 0 when it is kept.
REASONS = ("invalid_url", "bad_scheme", "private_host", "missing_caption", "non_utf8_caption",
           "empty_caption", "duplicate_url")
CODE = {reason: i + 1 for i, reason in enumerate(REASONS)}
DNS_THREADS = 64
# The common form, checked with one match and no parsing: http(s), a plain ASCII host name whose
# last label starts with a letter (never an address), an optional port urlsplit accepts, then
# printable ASCII after a "/". Any other URL is checked by `_check`. (RE2 has no look-arounds.)
_RE2_LABEL = r"[a-zA-Z0-9_](?:[a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?"
_RE2_LAST_LABEL = r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_COMMON_URL = (rf"^[hH][tT][tT][pP][sS]?://(?:{_RE2_LABEL}\.)*{_RE2_LAST_LABEL}"
               r"(?::[0-9]{1,4})?(?:/[!-~]*)?$")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_DOTTED_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


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
             and not labels[-1].isdigit() and _ip(host) is None)  # 0x7f000001 is no name
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




def as_utf8(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """`column` as UTF-8 text, and a mask of the values that were bytes but not UTF-8 (those
    become null). Numbers (a JSON list) become their text."""
    invalid = np.zeros(len(column), bool)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return column.cast(pa.string()), invalid
    try:
        return column.cast(pa.string()), invalid
    except pa.ArrowInvalid:  # some value is not UTF-8: find which, one by one
        texts = []
        for i, value in enumerate(column.to_pylist()):
            try:
                texts.append(None if value is None else value.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(None)
                invalid[i] = True
        return pa.array(texts, pa.string()), invalid


def _mask(array: pa.Array) -> np.ndarray:
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


def private_names(names, pool: Executor) -> set[str]:
    """The host names in `names` that resolve to a private address, each looked up once and
    many at a time; `resolve`'s cache is bounded, the answers of this call are kept for it."""
    names = list(names)
    return {name for name, ips in zip(names, pool.map(resolve, names))
            if any(is_private_address(ip) for ip in ips)}


def _common_hosts(urls: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(which URLs have the common form, their lower-cased hosts; the other hosts are junk)."""
    padded = pc.binary_join_element_wise(urls, "//", "")  # a third "/"-separated field for all
    authority = pc.list_element(pc.split_pattern(padded, "/", max_splits=3), 2)
    host = pc.ascii_lower(pc.list_element(pc.split_pattern(authority, ":", max_splits=1), 0))
    common = pc.and_(pc.match_substring_regex(urls, _COMMON_URL),
                     pc.less_equal(pc.binary_length(host), 253))
    return _mask(common), host


def url_codes(urls: pa.Array, allow_private_hosts: bool,
              pool: Executor) -> tuple[np.ndarray, pa.Array]:
    """(the refusal code (see CODE) of every URL of a batch, the URLs stripped): common ones
    checked by vectorised matches, the rest by `_check`; names resolved through `pool`."""
    urls = pc.ascii_trim_whitespace(urls)
    common, host = _common_hosts(urls)
    codes = np.zeros(len(urls), np.int8)
    pending, stripped = {}, []  # row -> host name still to resolve, among the uncommon URLs
    for row in np.flatnonzero(~common):
        url = urls[row].as_py()
        problem, name = _check(url, allow_private_hosts)
        codes[row] = CODE[problem] if problem else 0
        stripped.append(url and url.strip())  # str.strip: Unicode spaces too
        if name is not None:
            pending[row] = name
    if stripped:
        urls = pc.replace_with_mask(urls, pa.array(~common), pa.array(stripped, pa.string()))
    if not allow_private_hosts:
        _refuse_private_names(codes, common, host, pending, pool)
    return codes, urls


def _refuse_private_names(codes: np.ndarray, common: np.ndarray, host: pa.Array,
                          pending: dict, pool: Executor) -> None:
    """Mark localhost and the names that resolve to a private address as private_host."""
    local = _mask(pc.or_(pc.equal(host, "localhost"), pc.ends_with(host, ".localhost")))
    codes[common & local] = CODE["private_host"]
    names = pc.unique(pc.filter(host, pa.array(common & ~local))).to_pylist()
    private = private_names(set(names) | set(pending.values()), pool)
    if private:
        codes[common & _mask(pc.is_in(host, pa.array(sorted(private))))] = CODE["private_host"]
        for row, name in pending.items():
            codes[row] = CODE["private_host"] if name in private else codes[row]


def caption_codes(captions: pa.Array, not_utf8: np.ndarray) -> np.ndarray:
    """The refusal code of every caption of a batch of stripped caption texts; `not_utf8`
    marks the ones that were bytes but not UTF-8 (and are null here)."""
    codes = np.zeros(len(captions), np.int8)
    codes[_mask(pc.equal(pc.utf8_length(captions), 0))] = CODE["empty_caption"]
    codes[_mask(pc.is_null(captions))] = CODE["missing_caption"]
    codes[not_utf8] = CODE["non_utf8_caption"]
    return codes


def check_batch(batch: pa.RecordBatch, allow_private_hosts: bool, pool: Executor,
                image_root: str | None = None) -> tuple[pa.RecordBatch, np.ndarray]:
    """(the batch with its url and caption (first two columns) as stripped text, each row's
    refusal code): a URL's problem first, then its caption's. With `image_root` (the file://
    URL of a folder ending in "/", given by `vlp data download --images`), file URLs below it
    pass; data_prep.fetch confines them to that folder again when it reads them."""
    urls, bad_urls = as_utf8(batch.column(0))
    captions, bad_captions = as_utf8(batch.column(1))
    captions = pc.utf8_trim_whitespace(captions)
    codes, urls = url_codes(urls, allow_private_hosts, pool)
    if image_root:
        codes[_mask(pc.and_(pc.starts_with(urls, image_root),
                            pc.invert(pc.match_substring(urls, "/.."))))] = 0
    codes[bad_urls] = CODE["invalid_url"]
    codes = np.where(codes == 0, caption_codes(captions, bad_captions), codes)
    columns = [urls, captions, *batch.columns[2:]]
    return pa.RecordBatch.from_arrays(columns, ["url", "caption", *batch.schema.names[2:]]), codes
