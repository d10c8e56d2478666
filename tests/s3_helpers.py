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
