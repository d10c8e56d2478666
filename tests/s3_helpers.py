"""An S3 server for tests: moto's server mode on 127.0.0.1, with credentials and endpoint in the
environment (where a cluster job has them), so subprocesses such as training ranks see it too."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

SECRET = "not-a-real-secret-key-0123456789"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1"}


def clear_filesystems() -> None:
    """fsspec keeps one filesystem per set of options: forget them when the endpoint changes."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def moto_s3():
    """Start the server and point the AWS_* environment at it; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    clear_filesystems()
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear_filesystems()
        server.stop()


def upload_folder(folder: Path, prefix: str) -> None:
    """The files directly in `folder` to s3://PREFIX/ (bucket created when missing)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    bucket = prefix.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            fs.pipe_file(f"{prefix}/{path.name}", path.read_bytes())


@contextlib.contextmanager
def failing_proxy(endpoint: str, fails):
    """A proxy in front of the S3 server at `endpoint` that answers 500 InternalError instead of
    forwarding a GET when `fails(path, range_header)` says so; yields its URL. (botocore retries
    such an error itself unless AWS_MAX_ATTEMPTS=1; s3fs does not.)"""
    import http.client
    import http.server
    import threading
    import urllib.parse

    target = urllib.parse.urlparse(endpoint)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if fails(self.path, self.headers.get("Range")):
                body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                self.send_response(500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.forward()

        def do_HEAD(self):
            self.forward()

        def forward(self):
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            upstream.request(self.command, self.path, headers=dict(self.headers))
            response = upstream.getresponse()
            body = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            upstream.close()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
