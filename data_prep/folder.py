"""A shard folder on local disk or in object storage (`s3://`, `gs://`, ...), through fsspec: the
one set of file operations that download, index and reshard use, whichever the place.

An object store has no folders and no rename: a "folder" is a key prefix, and a write is one PUT,
which makes the object appear whole or not at all, so a JSON file written there needs no
temporary name (on local disk it gets one: files.write_json_atomic).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import require_dir, write_json_atomic
from vlp.pipeline.data.object_store import filesystem, is_object_url


def name_of(url: str) -> str:
    """The file name at the end of a path or URL."""
    return url.rsplit("/", 1)[-1]


class Folder:
    """The files directly in `location` (a local folder or an object-store prefix), by name."""

    def __init__(self, location):
        self.in_store = is_object_url(str(location))
        self.location = str(location).rstrip("/") if self.in_store else os.fspath(Path(location))
        self.fs, self.path = filesystem(self.location)

    def __str__(self) -> str:
        return self.location

    def check_bucket(self) -> None:
        """In an object store, a UserError before any work when the bucket does not exist."""
        bucket = self.path.split("/", 1)[0]
        if self.in_store and not self.fs.exists(bucket):
            raise UserError(f"{self.location}: the bucket {bucket!r} does not exist (or these "
                            "credentials cannot see it); create it, or check the endpoint and "
                            "the credentials")

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def names(self) -> list[str]:
        """The names of the files in the folder, sorted; [] when it does not exist."""
        self.fs.invalidate_cache()  # other processes (img2dataset's workers) write here
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(name_of(e["name"].rstrip("/")) for e in entries
                      if e["type"] == "file")

    def shards(self, what: str = "shard directory") -> list[str]:
        """The URLs of the *.tar files in the folder, sorted by name; a missing local folder is
        a UserError naming it as `what`."""
        if not self.in_store:
            require_dir(self.location, what)
        return [self.url(name) for name in self.names() if name.endswith(".tar")]

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when there is none."""
        try:
            return self.fs.cat_file(f"{self.path}/{name}")
        except FileNotFoundError:
            return None

    def write_json(self, name: str, obj) -> None:
        """Write `obj` as indented JSON; a reader never sees half of it."""
        if not self.in_store:
            write_json_atomic(Path(self.location, name), obj)
            return
        self.fs.pipe_file(f"{self.path}/{name}", (json.dumps(obj, indent=2) + "\n").encode())

    def delete(self, names: list[str], recursive: bool = False) -> None:
        """Delete these files (folders, with `recursive`) where they exist."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f"{self.path}/{name}", recursive=recursive)

    def upload(self, local: Path, name: str) -> None:
        """Replace the folder `name` here with the files of the local folder `local`."""
        self.delete([name], recursive=True)
        for path in sorted(local.iterdir()):
            if path.is_file():
                self.fs.put_file(str(path), f"{self.path}/{name}/{path.name}")
