"""Evaluation images: where their bytes are, and decoding a batch into model input.

Decoding uses the training transforms (`pipeline.transforms.preprocess_image`), so evaluation sees
exactly what training saw. A thread pool overlaps file reads and decodes (PIL releases the GIL).
"""
from __future__ import annotations

import os
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.object_store import is_object_url, read_range
from vlp.pipeline.data.transforms import preprocess_image


@dataclass(frozen=True)
class ImageRef:
    """One image's bytes: a whole file, or `size` bytes at `offset` inside a tar (member `name`)."""

    path: str
    offset: int = 0
    size: int = -1
    name: str = ""

    def read(self) -> bytes:
        if is_object_url(self.path):
            return read_range(self.path, self.offset, self.size)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self) -> str:
        return f"{self.path}:{self.name}" if self.name else self.path


def path_under(root: str | Path, relative: str, where: str) -> Path:
    """`root/relative`, refused when it leaves `root` (an absolute path, or `..` climbing out):
    annotation files name the images to read, never where else on disk to read from. The check
    is on the path as written, so symlinks inside the root (to a data mount) still work."""
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, relative))
    if os.path.commonpath([base, path]) != base:
        raise UserError(
            f"{where}: image path {relative!r} leads outside the image root {base}; paths in "
            "annotation files must stay under the image root (pass a common parent as the root)"
        )
    return Path(path)


def check_images_exist(images: list[ImageRef], context: str) -> None:
    """Fail before any model work when image files are missing, naming a few of them."""
    missing = sorted({ref.path for ref in images if not Path(ref.path).is_file()})
    if missing:
        raise UserError(
            f"{len(missing)} image file(s) missing for {context}, e.g. {', '.join(missing[:3])}"
        )


def load_image(ref: ImageRef, image_size: int) -> torch.Tensor:
    """Normalised (3, S, S) tensor; an undecodable image is an error naming its file."""
    try:
        return preprocess_image(ref.read(), image_size)
    except (BadData, OSError) as exc:
        raise UserError(f"cannot read image {ref}: {exc}") from exc


def load_images(
    refs: list[ImageRef], image_size: int, pool: Executor | None = None
) -> torch.Tensor:
    """Stack of `load_image` for a batch: (B, 3, S, S)."""
    mapper = pool.map if pool is not None else map
    return torch.stack(list(mapper(lambda ref: load_image(ref, image_size), refs)))
