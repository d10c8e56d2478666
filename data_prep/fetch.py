"""img2dataset's image fetch, made safe for untrusted URL lists.

img2dataset fetches with `urllib.request.urlopen`, which follows redirects to any http(s) or ftp
URL, connects to whatever the name resolves to at that moment, and reads a body to its end. Here:

- every redirect hop passes the same filter as the listed URL (`urls.url_problem`: http(s) only,
  no private, loopback, link-local or reserved host unless allowed);
- the connection goes to an address that was checked, resolved once (no second lookup that DNS
  rebinding could answer differently), with TLS still verified against the host name; behind an
  HTTP proxy the proxy connects, so only the URL of each hop is checked;
- a body is read up to `max_bytes` (a larger Content-Length is refused before reading) and
  within a total deadline, not only a per-read timeout;
- file URLs are read only with `image_root` (`vlp data download --images DIR`), only below
  that folder once links are followed, and never reached through a redirect.

`SafeDownloader` is img2dataset's Downloader with this fetch: `download_shards` has img2dataset
build it, and each worker process (multiprocessing's spawn, Spark executors) installs the fetch
when it unpickles and calls it.
"""
from __future__ import annotations

import http.client
import io
import os
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

# img2dataset imports albumentations, which would ask PyPI for updates in every process.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset import downloader as img2dataset_downloader  # noqa: E402

from vlp.data_prep.urls import is_private_address, resolve_uncached, url_problem  # noqa: E402

READ_CHUNK = 1 << 16
DEADLINE_TIMEOUTS = 4  # a body must arrive within this many `timeout`s in all


class FetchRefused(OSError):
    """A hop or an address the filter refuses, or a body over the limits."""


def _checked_connection(allow_private_hosts: bool):
    """socket.create_connection that resolves once and refuses private addresses."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None,
                          **kwargs):
        host, port = address
        ips = resolve_uncached(host)
        if not ips:
            raise FetchRefused(f"{host} does not resolve")
        if not allow_private_hosts and any(is_private_address(ip) for ip in ips):
            raise FetchRefused(f"{host} resolves to a private address (private_host)")
        return socket.create_connection((str(ips[0]), port), timeout, source_address)

    return create_connection


def checked_opener(allow_private_hosts: bool) -> urllib.request.OpenerDirector:
    """A urllib opener that connects only to checked addresses and checks every redirect."""
    connect = _checked_connection(allow_private_hosts)

    class CheckedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class CheckedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class CheckedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            proxied = req.has_proxy()
            return self.do_open(http.client.HTTPConnection if proxied else CheckedHTTPConnection,
                                req)

    class CheckedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            proxied = req._tunnel_host is not None  # CONNECT through a proxy: it connects
            connection = http.client.HTTPSConnection if proxied else CheckedHTTPSConnection
            return self.do_open(connection, req, context=self._context)

    class CheckedRedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            problem = url_problem(newurl, allow_private_hosts)
            if problem:
                raise FetchRefused(f"redirect to {newurl[:200]!r} refused ({problem})")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(CheckedHTTPHandler, CheckedHTTPSHandler,
                                       CheckedRedirectHandler)


def read_limited(response, max_bytes: int, deadline: float) -> bytes:
    """The body of `response`, refused when it is over `max_bytes` or still arriving at
    `deadline` (time.monotonic())."""
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise FetchRefused(f"image of {int(length)} bytes is over the {max_bytes}-byte limit")
    body = bytearray()
    # read1: what has arrived (up to the size), so a trickling body meets the deadline check
    while chunk := response.read1(min(READ_CHUNK, max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > max_bytes:
            raise FetchRefused(f"image is over the {max_bytes}-byte limit")
        if time.monotonic() > deadline:
            raise FetchRefused("image still arriving after the download deadline")
    return bytes(body)


def read_local(url: str, image_root: str, max_bytes: int) -> bytes:
    """The bytes of a file URL, refused when its real path (links followed) is not below the
    folder `image_root` names, or when it is over `max_bytes`."""
    root = Path(urllib.request.url2pathname(urlsplit(image_root).path)).resolve()
    path = Path(urllib.request.url2pathname(urlsplit(url).path)).resolve()
    if not path.is_relative_to(root):
        raise FetchRefused(f"{url[:200]!r} is outside the --images folder (bad_scheme)")
    if path.stat().st_size > max_bytes:
        raise FetchRefused(f"image of {path.stat().st_size} bytes is over the {max_bytes}-byte "
                           "limit")
    return path.read_bytes()


def make_download_image(allow_private_hosts: bool, max_bytes: int,
                        image_root: str | None = None):
    """A drop-in for img2dataset's `download_image` that fetches through the checks above."""
    opener = checked_opener(allow_private_hosts)
    user_agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        agent = user_agent
        if user_agent_token:
            agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
        deadline = time.monotonic() + DEADLINE_TIMEOUTS * timeout
        try:
            if image_root and url.startswith(image_root):
                return key, io.BytesIO(read_local(url, image_root, max_bytes)), None
            problem = url_problem(url, allow_private_hosts)
            if problem:
                raise FetchRefused(f"refused ({problem})")
            request = urllib.request.Request(url, headers={"User-Agent": agent})
            with opener.open(request, timeout=timeout) as response:
                if disallowed_header_directives and img2dataset_downloader.is_disallowed(
                        response.headers, user_agent_token, disallowed_header_directives):
                    return key, None, "Use of image disallowed by X-Robots-Tag directive"
                return key, io.BytesIO(read_limited(response, max_bytes, deadline)), None
        except Exception as err:  # noqa: BLE001 - img2dataset counts any failure per sample
            return key, None, str(err)

    return download_image


class SafeDownloader(img2dataset_downloader.Downloader):
    """img2dataset's Downloader whose fetch follows the rules of this module."""

    def __init__(self, *args, allow_private_hosts: bool, max_image_bytes: int,
                 image_root: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_private_hosts = allow_private_hosts
        self.max_image_bytes = max_image_bytes
        self.image_root = image_root

    def __call__(self, row):
        # In the worker process: img2dataset's download loop calls this module-level name.
        img2dataset_downloader.download_image = make_download_image(
            self.allow_private_hosts, self.max_image_bytes, self.image_root)
        return super().__call__(row)
