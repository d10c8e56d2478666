"""A folder of images as a URL list: `vlp data download --images DIR` ingests local files
without a server.

Each image (IMAGE_EXTENSIONS, any depth, symbolic links not followed out of the folder) becomes
a row: its file:// URL and the text of the `.txt` file beside it (same name, `.txt`: the caption;
a missing one is counted as missing_caption). Only this flag makes file URLs fetchable, and only
below the folder: a URL list never does.
"""
from __future__ import annotations

from pathlib import Path

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import require_dir
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS


def image_root(folder) -> str:
    """The file:// URL prefix of everything below `folder` (resolved, ending in "/")."""
    return require_dir(folder, "--images").resolve().as_uri().rstrip("/") + "/"


def write_image_list(folder, path: Path) -> Path:
    """Write the (url, caption) rows of the images below `folder` to the parquet `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = require_dir(folder, "--images").resolve()
    images = sorted(p for p in root.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTENSIONS
                    and p.is_file() and p.resolve().is_relative_to(root))
    if not images:
        raise UserError(f"--images {folder}: no {'/'.join(IMAGE_EXTENSIONS)} file below it")
    captions = [(p.with_suffix(".txt").read_bytes() if p.with_suffix(".txt").is_file() else None)
                for p in images]
    pq.write_table(pa.table({"url": [p.as_uri() for p in images],
                             "caption": pa.array(captions, pa.binary())}), path)
    return path
