"""A threaded static-file HTTP server on the loopback interface, so img2dataset downloads the
synthetic world over real HTTP exactly as it would download the web.
"""
from __future__ import annotations

import contextlib
import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import require_dir


HOST = "127.0.0.1"


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without logging every request to stderr."""

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass


@contextlib.contextmanager
def serve_directory(root, port: int = 0, handler=QuietHandler):
    """Serve `root` on 127.0.0.1:`port` (0 = any free port) in a thread; yield the base URL."""
    require_dir(root, "directory to serve")
    try:
        server = ThreadingHTTPServer((HOST, port), functools.partial(handler, directory=str(root)))
    except OSError as exc:
        raise UserError(f"cannot listen on {HOST}:{port}: {exc}") from exc
    thread = threading.Thread(target=server.serve_forever, daemon=True, name=f"serve {root}")
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def serve_world(world_dir):
    """Serve a synthetic world at the base URL its world.json records; yield that URL."""
    world = json.loads((Path(world_dir) / "world.json").read_text())
    url = urlsplit(world["base_url"])
    if url.hostname != HOST or url.port is None:
        raise ValueError(f"world base_url {world['base_url']!r} is not http://{HOST}:PORT")
    with serve_directory(world_dir, url.port) as base_url:
        yield base_url
