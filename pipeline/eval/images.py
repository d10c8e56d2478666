"""Evaluation images: where their bytes are, and decoding a batch into model input.

Images are files or byte ranges of uncompressed webdataset tars (read with the project's tar
reader, so a test set costs no memory until it is encoded). Decoding uses the training transforms
(`pipeline.data.transforms.preprocess_image`), so evaluation sees exactly what training saw. A thread
pool overlaps file reads and decodes (PIL releases the GIL).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.object_store import is_object_url, read_range
from vlp.pipeline.data.tar import SkipCounter, read_samples
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS, preprocess_image


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


def tar_samples(
    path: str | Path, wanted: frozenset[str]
) -> Iterator[tuple[str, ImageRef | None, dict[str, bytes]]]:
    """(key, image, {ext: bytes} of its `wanted` members) per sample of an uncompressed webdataset
    tar, local or in object storage; the image (jpg/jpeg/png/webp, None when the sample has none)
    is a byte range of the tar (a ranged read in object storage). A missing, compressed or damaged tar is a UserError: a test set that is not
    complete gives numbers no one can compare. Repeated keys are dropped as the training loader
    drops them."""
    path = os.fspath(path).removeprefix("file://")
    if "://" in path and not is_object_url(path):
        raise UserError(f"evaluation shards must be local files or in object storage: {path}")
    if not path.endswith(".tar"):
        raise UserError(f"evaluation shard {path} is not an uncompressed .tar: images are read "
                        "in place from the tar, so decompress it first")
    if not is_object_url(path) and not Path(path).is_file():
        raise UserError(f"evaluation shard not found: {path}")
    try:
        for sample in read_samples(path, wanted, SkipCounter(), frozenset(IMAGE_EXTENSIONS)):
            key = sample.pop("__key__")
            spans = [sample.pop(ext) for ext in IMAGE_EXTENSIONS if ext in sample]
            image = ImageRef(path, spans[0].offset, spans[0].size, spans[0].name) if spans else None
            yield key, image, sample
    except BadData as exc:
        raise UserError(f"evaluation shard {path} is unreadable ({exc.kind}): {exc}") from exc


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


def load_decodable_images(
    refs: list[ImageRef], image_size: int, skipped: SkipCounter, pool: Executor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `load_images`, but an image that does not decode is counted in `skipped` (by
    BadData kind) and left out: (pixels of the decodable ones (G, 3, S, S), bool mask (B,))."""

    def decode(ref: ImageRef) -> torch.Tensor | BadData:
        try:
            return preprocess_image(ref.read(), image_size)
        except BadData as exc:
            return exc
        except OSError as exc:
            raise UserError(f"cannot read image {ref}: {exc}") from exc

    decoded = list((pool.map if pool is not None else map)(decode, refs))
    for bad in decoded:
        if isinstance(bad, BadData):
            skipped.add(bad.kind)
    images = [image for image in decoded if isinstance(image, torch.Tensor)]
    pixels = torch.stack(images) if images else torch.empty(0, 3, image_size, image_size,
                                                           dtype=torch.uint8)
    return pixels, torch.tensor([isinstance(image, torch.Tensor) for image in decoded])
