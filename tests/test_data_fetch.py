"""The fetch img2dataset runs with: every redirect hop and every address checked, bodies bounded.
Real sockets on the loopback interface; a server that counts the requests it was sent."""
from __future__ import annotations

import email.message
import ipaddress
import socket
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlp.data_prep import fetch
from vlp.data_prep.fetch import (
    FetchRefused,
    SafeDownloader,
    checked_opener,
    make_download_image,
    read_limited,
    read_local,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


class Handler(BaseHTTPRequestHandler):
    """/image, /redirect?URL (302 to URL), /endless (a body that never ends), /huge (claims
    10 GB), /drip (a byte every 0.2 s), /noai (an image whose X-Robots-Tag forbids AI use)."""

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_CONNECT(self):  # as an HTTPS proxy: record the tunnel asked for, then refuse it
        self.server.hits.append(f"CONNECT {self.path}")
        self.send_error(403)

    def do_GET(self):
        self.server.hits.append(self.path)
        self.server.agents.append(self.headers["User-Agent"])
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query)
            self.end_headers()
            return
        self.send_response(200)
        if path == "/noai":
            self.send_header("X-Robots-Tag", "otherbot: noindex")
            self.send_header("X-Robots-Tag", "noai, noimageai")
            self.send_header("X-Robots-Tag", "mybot: noimageindex")
        if path == "/huge":
            self.send_header("Content-Length", str(10**10))
        elif path == "/image":
            self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        try:
            if path in ("/image", "/noai"):
                self.wfile.write(PNG)
            elif path in ("/endless", "/huge"):
                while True:
                    self.wfile.write(b"\0" * 65536)
            elif path == "/drip":
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
        except OSError:  # the client gave up
            pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.hits, httpd.agents = [], []
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_the_connection_goes_only_to_checked_addresses(server):
    port = server.server_address[1]
    opener = checked_opener(allow_private_hosts=False)
    # Loopback however the client spells it (a name resolving to it stands for DNS rebinding).
    for host in ("127.0.0.1", "localhost", "2130706433", "127.1", "%31%32%37.0.0.1",
                 "user@127.0.0.1", "[::ffff:127.0.0.1]"):
        with pytest.raises(OSError):
            opener.open(f"http://{host}:{port}/image", timeout=2)
    assert server.hits == []  # no request ever reached the server
    with checked_opener(allow_private_hosts=True).open(f"http://127.0.0.1:{port}/image") as r:
        assert r.read() == PNG


def test_every_redirect_hop_passes_the_url_filter(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with socket.socket() as ftp:  # a port that would see a connection if ftp: were followed
        ftp.bind(("127.0.0.1", 0))
        ftp.listen()
        ftp.settimeout(0.5)
        download = make_download_image(allow_private_hosts=True, max_bytes=1 << 20)
        target = f"ftp://127.0.0.1:{ftp.getsockname()[1]}/a.jpg"  # urllib would follow it
        key, stream, error = download((7, f"{base}/redirect?{target}"), 2, None, None)
        assert (key, stream) == (7, None) and "refused (bad_scheme)" in error
        with pytest.raises(socket.timeout):
            ftp.accept()
    # an allowed hop is followed
    key, stream, error = download((1, f"{base}/redirect?{base}/image"), 2, None, None)
    assert error is None and stream.read() == PNG
    # without --allow-private-hosts a public page redirecting to loopback is refused at the hop
    handler = next(h for h in checked_opener(False).handlers if hasattr(h, "redirect_request"))
    with pytest.raises(FetchRefused, match=r"private_host"):
        handler.redirect_request(None, None, 302, "Found", {}, f"{base}/image")


def test_bodies_are_bounded_in_size_and_time(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    download = make_download_image(allow_private_hosts=True, max_bytes=1 << 20)
    _, stream, error = download((0, f"{base}/endless"), 2, None, None)
    assert stream is None and "over the 1048576-byte limit" in error
    _, stream, error = download((0, f"{base}/huge"), 2, None, None)
    assert stream is None and f"image of {10**10} bytes is over" in error
    started = time.monotonic()
    _, stream, error = download((0, f"{base}/drip"), 0.5, None, None)  # deadline: 4 x 0.5 s
    assert stream is None and "after the download deadline" in error
    assert time.monotonic() - started < 4


@pytest.fixture
def fake_dns(monkeypatch):
    """The fetch's resolver seam: *.loop names resolve to loopback, *.mixed to a public and a
    private address, *.public to a public one; anything else does not resolve."""
    answers = {"loop": ("127.0.0.1",), "mixed": ("8.8.8.8", "10.0.0.1"), "public": ("8.8.8.8",)}

    def resolve(host):
        return tuple(map(ipaddress.ip_address, answers.get(host.rpartition(".")[2], ())))

    monkeypatch.setattr(fetch, "resolve_uncached", resolve)


def test_a_name_connects_to_the_address_it_was_checked_at(server, fake_dns):
    """site.loop exists only in the fake resolver: reaching the server proves the connection
    used the checked address, not a second lookup."""
    port = server.server_address[1]
    with checked_opener(allow_private_hosts=True).open(f"http://site.loop:{port}/image") as r:
        assert r.read() == PNG
    for url in (f"http://site.loop:{port}/image", f"https://site.loop:{port}/image",
                f"http://site.mixed:{port}/image", f"http://site.nowhere:{port}/image"):
        with pytest.raises(urllib.error.URLError) as raised:
            checked_opener(allow_private_hosts=False).open(url, timeout=2)
        assert isinstance(raised.value.reason, FetchRefused)
    assert server.hits == ["/image"]


def test_connections_resolve_once_refuse_any_private_answer_and_pass_their_arguments(
        fake_dns, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch.socket, "create_connection", lambda *args: calls.append(args))
    strict, lax = fetch._checked_connection(False), fetch._checked_connection(True)
    strict(("a.public", 443), 7, ("0.0.0.0", 0))
    lax(("a.loop", 80))
    assert calls == [(("8.8.8.8", 443), 7, ("0.0.0.0", 0)),
                     (("127.0.0.1", 80), socket._GLOBAL_DEFAULT_TIMEOUT, None)]
    with pytest.raises(FetchRefused, match=r"^a.mixed resolves to a private address \(private"):
        strict(("a.mixed", 80), 7)
    with pytest.raises(FetchRefused, match=r"^a.nowhere does not resolve$"):
        lax(("a.nowhere", 80), 7)
    assert len(calls) == 2


def test_behind_a_proxy_the_proxy_connects(server, fake_dns, monkeypatch):
    """The proxy (the test server, on loopback) is reached although loopback is refused: it,
    not this process, connects to the host of the URL."""
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with checked_opener(allow_private_hosts=False).open("http://images.public/a.png") as r:
        assert r.status == 200
    assert server.hits == ["http://images.public/a.png"]
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    with pytest.raises(OSError, match="403"):
        checked_opener(allow_private_hosts=False).open("https://images.public/a.png", timeout=2)
    assert server.hits[1:] == ["CONNECT images.public:443"]


class Response:
    """A response whose body arrives in the chunks given (each read returns at most one)."""

    def __init__(self, chunks: list[bytes], length: str | None = None):
        self.chunks, self.asked = list(chunks), []
        self.headers = email.message.Message()
        if length is not None:
            self.headers["Content-Length"] = length

    def read1(self, size):
        self.asked.append(size)
        if not self.chunks:
            return b""
        chunk, self.chunks[0] = self.chunks[0][:size], self.chunks[0][size:]
        if not self.chunks[0]:
            self.chunks.pop(0)
        return chunk


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_not():
    far = time.monotonic() + 60
    assert read_limited(Response([b"abc", b"de"], "5"), 5, far) == b"abcde"
    assert read_limited(Response([b"abcde"], "junk"), 5, far) == b"abcde"
    with pytest.raises(FetchRefused, match=r"^image of 6 bytes is over the 5-byte limit$"):
        read_limited(Response([b"abcde"], "6"), 5, far)
    with pytest.raises(FetchRefused, match=r"^image is over the 5-byte limit$"):
        read_limited(Response([b"abc", b"def"]), 5, far)
    response = Response([b"x" * 150000])  # read in chunks of 64 KiB, never past the limit
    assert len(read_limited(response, 150000, far)) == 150000
    assert response.asked == [65536, 65536, 150001 - 131072, 1]


def test_a_body_still_arriving_at_the_deadline_is_refused():
    assert read_limited(Response([]), 5, time.monotonic() - 1) == b""
    with pytest.raises(FetchRefused, match="^image still arriving after the download deadline$"):
        read_limited(Response([b"a", b"b"]), 5, time.monotonic() - 1)


def test_file_urls_are_read_only_below_the_image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"12345")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "images2").mkdir()
    (tmp_path / "images2" / "b.png").write_bytes(b"b")
    base = root.as_uri() + "/"
    assert read_local(base + "sub/a.png", base, 5) == b"12345"
    assert read_local(base + "sub/%61.png", base, 5) == b"12345"
    with pytest.raises(FetchRefused, match=r"^image of 5 bytes is over the 4-byte limit$"):
        read_local(base + "sub/a.png", base, 4)
    sibling = (tmp_path / "images2/b.png").as_uri()
    for outside in (base + "link.png", base + "../secret.png", sibling):
        with pytest.raises(FetchRefused, match=r"is outside the --images folder \(bad_scheme\)"):
            read_local(outside, base, 100)


def test_the_download_names_its_agent_and_reads_file_urls_below_the_root(server, tmp_path):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    download = make_download_image(allow_private_hosts=True, max_bytes=1 << 20,
                                   image_root=tmp_path.as_uri() + "/")
    assert download((1, f"{base}/image"), 2, None, None)[1].read() == PNG
    assert download((2, f"{base}/image"), 2, "mybot", [])[1].read() == PNG
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    assert server.agents == [
        agent, agent + " (compatible; mybot; +https://github.com/rom1504/img2dataset)"]
    (tmp_path / "a.png").write_bytes(PNG)
    key, stream, error = download((3, (tmp_path / "a.png").as_uri()), 2, None, None)
    assert (key, stream.read(), error) == (3, PNG, None)
    key, stream, error = download((4, (tmp_path / "none.png").as_uri()), 2, None, None)
    assert (key, stream) == (4, None) and "none.png" in error
    plain = make_download_image(allow_private_hosts=True, max_bytes=1 << 20)
    assert plain((5, (tmp_path / "a.png").as_uri()), 2, None, None) == (
        5, None, "refused (bad_scheme)")


def test_the_download_refuses_private_hosts_before_any_request(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    download = make_download_image(allow_private_hosts=False, max_bytes=1 << 20)
    assert download((0, f"{base}/image"), 2, None, None) == (0, None, "refused (private_host)")
    assert server.hits == []


def test_an_x_robots_tag_forbidding_ai_use_is_obeyed_when_asked(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    download = make_download_image(allow_private_hosts=True, max_bytes=1 << 20)
    assert download((0, f"{base}/noai"), 2, "mybot", ["noai"]) == (
        0, None, "Use of image disallowed by X-Robots-Tag directive")
    assert download((1, f"{base}/noai"), 2, "mybot", ["noindex"])[1].read() == PNG
    assert download((2, f"{base}/noai"), 2, "mybot", None)[1].read() == PNG
    assert download((3, f"{base}/noai"), 2, "mybot", ["noimageindex"])[1] is None  # to mybot
    assert download((4, f"{base}/noai"), 2, "yourbot", ["noimageindex"])[1].read() == PNG


def test_a_body_has_four_timeouts_in_all(monkeypatch, server):
    deadlines = []
    monkeypatch.setattr(fetch, "read_limited", lambda r, m, deadline: deadlines.append(deadline))
    monkeypatch.setattr(fetch.time, "monotonic", lambda: 1000.0)
    download = make_download_image(allow_private_hosts=True, max_bytes=1 << 20)
    download((0, f"http://127.0.0.1:{server.server_address[1]}/image"), 2.5, None, None)
    assert deadlines == [1010.0]


def test_the_safe_downloader_installs_its_fetch_in_the_worker(monkeypatch, server, tmp_path):
    init_args = []
    monkeypatch.setattr(fetch.img2dataset_downloader.Downloader, "__init__",
                        lambda self, *a, **k: init_args.append((a, k)))
    monkeypatch.setattr(fetch.img2dataset_downloader.Downloader, "__call__",
                        lambda self, row: (row, fetch.img2dataset_downloader.download_image))
    monkeypatch.setattr(fetch.img2dataset_downloader, "download_image", None)
    (tmp_path / "tiny.png").write_bytes(b"tiny")
    downloader = SafeDownloader("writer", timeout=3, allow_private_hosts=False,
                                max_image_bytes=10, image_root=tmp_path.as_uri() + "/")
    assert init_args == [(("writer",), {"timeout": 3})]
    row, download_image = downloader("row")
    assert row == "row" and download_image is fetch.img2dataset_downloader.download_image
    base = f"http://127.0.0.1:{server.server_address[1]}"
    assert download_image((0, f"{base}/image"), 2, None, None)[2] == "refused (private_host)"
    assert download_image((1, (tmp_path / "tiny.png").as_uri()), 2, None, None)[1].read() == b"tiny"
    downloader.allow_private_hosts = True
    _, download_image = downloader("row")
    assert "over the 10-byte limit" in download_image((0, f"{base}/image"), 2, None, None)[2]


def test_a_refusal_quotes_at_most_200_characters_of_a_hostile_url(tmp_path):
    root = (tmp_path / "images").as_uri() + "/"
    url = (tmp_path / ("x" * 300)).as_uri()
    with pytest.raises(FetchRefused) as raised:
        read_local(url, root, 10)
    assert str(raised.value) == f"{url[:200]!r} is outside the --images folder (bad_scheme)"
    handler = next(h for h in checked_opener(False).handlers if hasattr(h, "redirect_request"))
    target = "ftp://example.com/" + "y" * 300
    with pytest.raises(FetchRefused) as raised:
        handler.redirect_request(None, None, 302, "Found", {}, target)
    assert str(raised.value) == f"redirect to {target[:200]!r} refused (bad_scheme)"


def test_a_server_that_never_answers_costs_one_timeout():
    with socket.socket() as silent:  # accepts connections (the backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        download = make_download_image(allow_private_hosts=True, max_bytes=1 << 20)
        for scheme in ("http", "https"):  # https: no answer to the TLS handshake either
            started = time.monotonic()
            key, stream, error = download(
                (0, f"{scheme}://127.0.0.1:{silent.getsockname()[1]}/a"), 0.3, None, None)
            assert (key, stream) == (0, None) and "timed out" in error
            assert time.monotonic() - started < 3
