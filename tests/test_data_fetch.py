"""The fetch img2dataset runs with: every redirect hop and every address checked, bodies bounded.
Real sockets on the loopback interface; a server that counts the requests it was sent."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlp.data_prep.fetch import FetchRefused, checked_opener, make_download_image

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


class Handler(BaseHTTPRequestHandler):
    """/image, /redirect?URL (302 to URL), /endless (a body that never ends), /huge (claims
    10 GB), /drip (a byte every 0.2 s)."""

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query)
            self.end_headers()
            return
        self.send_response(200)
        if path == "/huge":
            self.send_header("Content-Length", str(10**10))
        elif path == "/image":
            self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        try:
            if path == "/image":
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
    httpd.hits = []
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
