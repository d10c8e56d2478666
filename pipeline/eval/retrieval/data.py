"""Retrieval test sets: Karpathy-split JSON + image root, or retrieval webdataset shards.

Both load to a `RetrievalSet`: a list of image references, a flat list of captions and, per
caption, the index of its image. Images are read lazily (a file, or a byte range of an uncompressed
tar), so a 5k-image test set costs no memory until it is encoded. All inputs are checked before
any model work: a missing image or an empty split is an error naming the file.
"""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from vlp.pipeline.data.errors import BadData, UserError
from vlp.pipeline.data.files import read_json, require
from vlp.pipeline.data.tar import SkipCounter, read_samples
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS
from vlp.pipeline.eval.images import ImageRef, check_images_exist, path_under

# webdataset's rule: the key is the member path up to the first dot of its file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class RetrievalSet:
    images: list[ImageRef]
    captions: list[str]
    text_to_image: list[int]  # caption index -> image index
    source: str

    def __post_init__(self):
        if not self.images or not self.captions:
            raise UserError(
                f"{self.source}: empty retrieval set ({len(self.images)} images, "
                f"{len(self.captions)} captions)"
            )


def load_karpathy(
    json_path: str | Path, image_root: str | Path, split: str = "test"
) -> RetrievalSet:
    """Karpathy JSON (Flickr30k/COCO layouts): images[].filename, optional filepath, split and
    sentences[].raw. An image's path is image_root/filepath/filename and must stay under
    image_root."""
    data = read_json(json_path, "Karpathy split JSON")
    entries = require(data, "images", str(json_path), list)
    image_root = Path(image_root)
    images, captions, text_to_image, splits = [], [], [], set()
    for i, entry in enumerate(entries):
        where = f"{json_path}: images[{i}]"
        entry_split = require(entry, "split", where, str)
        splits.add(entry_split)
        if entry_split != split:
            continue
        filename = require(entry, "filename", where, str)
        filepath = require(entry, "filepath", where, str) if "filepath" in entry else ""
        path = path_under(image_root, os.path.join(filepath, filename), where)
        for j, sentence in enumerate(require(entry, "sentences", where, list)):
            captions.append(require(sentence, "raw", f"{where}.sentences[{j}]", str))
            text_to_image.append(len(images))
        images.append(ImageRef(str(path)))
    if not images:
        raise UserError(
            f"{json_path}: split {split!r} has no images; splits present: {sorted(splits)}"
        )
    check_images_exist(images, f"{json_path} (split {split!r}, image root {image_root})")
    return RetrievalSet(images, captions, text_to_image, source=f"{json_path}:{split}")


def load_retrieval_shards(urls: str | list[str]) -> RetrievalSet:
    """CLIP_benchmark-style retrieval shards: per sample an image (jpg/jpeg/png/webp) and a .txt
    with one caption per line. `urls`: local, uncompressed tars; brace patterns expand
    ("a/{000..009}.tar")."""
    paths = [p for url in ([urls] if isinstance(urls, str) else urls) for p in braceexpand(url)]
    images, captions, text_to_image = [], [], []
    for path in paths:
        if "://" in path and not path.startswith("file://"):
            raise UserError(f"retrieval shards must be local files (copy them first): {path}")
        path = path.removeprefix("file://")
        for key, image, text in _tar_samples(path):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if not lines:
                raise UserError(f"{path}: sample {key!r} has an empty .txt (no captions)")
            captions.extend(lines)
            text_to_image.extend([len(images)] * len(lines))
            images.append(image)
    return RetrievalSet(images, captions, text_to_image, source=",".join(paths))


def _tar_samples(path: str):
    """(key, ImageRef, caption text) per sample of an uncompressed webdataset tar."""
    if not Path(path).is_file():
        raise UserError(f"retrieval shard not found: {path}")
    _check_complete(path)
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                match = _KEY_RE.match(member.name)
                if member.isfile() and match:
                    members.setdefault(match.group(1), {})[match.group(2).lower()] = member
            texts = {
                key: tar.extractfile(parts["txt"]).read().decode("utf-8")
                for key, parts in members.items()
                if "txt" in parts
            }
    except (tarfile.TarError, UnicodeDecodeError, EOFError) as exc:
        raise UserError(f"retrieval shard {path} is unreadable: {exc}") from exc
    for key, parts in members.items():
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image is None or key not in texts:
            missing = "an image (" + "/".join(IMAGE_EXTENSIONS) + ")" if image is None else "a .txt"
            raise UserError(f"{path}: sample {key!r} has no {missing}")
        yield key, ImageRef(path, image.offset_data, image.size, image.name), texts[key]


def _check_complete(path: str) -> None:
    """tarfile takes a tar cut at a member boundary for a complete one (the eval would run on
    part of the test set): walk the headers with the training reader, which needs the
    end-of-archive marker and valid header checksums (nothing is read into memory)."""
    try:
        for _ in read_samples(path, frozenset(), SkipCounter()):
            pass
    except BadData as exc:
        raise UserError(f"retrieval shard {path} is incomplete or damaged ({exc}); the test set "
                        "would be evaluated in part. Copy or download it again.") from exc
