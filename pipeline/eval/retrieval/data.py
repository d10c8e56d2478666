"""Retrieval test sets: Karpathy-split JSON + image root, or retrieval webdataset shards.

Both load to a `RetrievalSet`: a list of image references, a flat list of captions and, per
caption, the index of its image. Images are read lazily (a file, or a byte range of an uncompressed
tar), so a 5k-image test set costs no memory until it is encoded. All inputs are checked before
any model work: a missing image or an empty split is an error naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.transforms import IMAGE_EXTENSIONS
from vlp.pipeline.eval.images import ImageRef, tar_samples
from vlp.pipeline.eval.karpathy import read_karpathy


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
    """A split of a Karpathy JSON (Flickr30k/COCO layouts; `vlp.pipeline.eval.karpathy`)."""
    entries = read_karpathy(json_path, image_root, [split])
    captions, text_to_image = [], []
    for index, entry in enumerate(entries):
        captions.extend(entry.sentences)
        text_to_image.extend([index] * len(entry.sentences))
    return RetrievalSet([entry.image for entry in entries], captions, text_to_image,
                        source=f"{json_path}:{split}")


def load_retrieval_shards(urls: str | list[str]) -> RetrievalSet:
    """CLIP_benchmark-style retrieval shards: per sample an image (jpg/jpeg/png/webp) and a .txt
    with one caption per line. `urls`: uncompressed tars, local or in object storage (s3://...);
    brace patterns expand ("a/{000..009}.tar")."""
    paths = [p for url in ([urls] if isinstance(urls, str) else urls) for p in braceexpand(url)]
    images, captions, text_to_image = [], [], []
    for path in paths:
        for key, image, members in tar_samples(path, frozenset({"txt"})):
            if image is None or "txt" not in members:
                missing = f"an image ({'/'.join(IMAGE_EXTENSIONS)})" if image is None else "a .txt"
                raise UserError(f"{path}: sample {key!r} has no {missing}")
            try:
                text = members["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: sample {key!r} has a .txt that is not UTF-8") from exc
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if not lines:
                raise UserError(f"{path}: sample {key!r} has an empty .txt (no captions)")
            captions.extend(lines)
            text_to_image.extend([len(images)] * len(lines))
            images.append(image)
    return RetrievalSet(images, captions, text_to_image, source=",".join(paths))

