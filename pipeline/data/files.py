"""Reading JSON inputs with errors that name the file and field; writing results atomically.

Every result file (JSON, parquet, PNG, HTML, manifests, checkpoint markers) is written to a
temporary file in the same directory and moved into place with `os.replace`, so a crash or a full
disk never leaves a half-written file that a later run (resume, the nightly job's "already
evaluated?" check) would trust. The file gets the mode a plain `open` would give it (0644 under
the usual umask). A kill leaves the temporary file instead (`.NAME.XXXXXXXX.tmp`);
`remove_temp_files` clears those of a folder that no writer is using.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from vlp.pipeline.data.errors import UserError


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a directory; else a UserError saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        return path
    found = "is a file, not a directory" if path.exists() else "does not exist"
    raise UserError(f"{what} {path} {found}")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; `what` says what the file should be, for the error message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from exc


def require(record: dict, key: str, source: str, types: type | tuple[type, ...] = object) -> Any:
    """`record[key]`, or a UserError naming the file/entry and the missing or bad field."""
    if not isinstance(record, dict) or key not in record:
        raise UserError(f"{source}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise UserError(f"{source}: field {key!r} should be {names}, got {value!r:.80}")
    return value


TEMP_SUFFIX = ".tmp"
# atomic_path's temporary names: "." + target name + "." + mkstemp's 8 random characters + suffix
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it into place, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the group
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it (Linux); 022 where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that atomic writes killed mid-way left under `folder`; returns
    them. Only while no writer is at work there (e.g. under the lock of the job that owns it)."""
    left = [path for path in Path(folder).rglob(f".*{TEMP_SUFFIX}")
            if TEMP_NAME.fullmatch(path.name) and path.is_file()]
    for path in left:
        path.unlink(missing_ok=True)
    return left


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
