"""Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`), read for retrieval and
captioning:

    {"images": [{"filename", "filepath" (optional), "split", "sentences": [{"raw"}, ...],
                 "cocoid" (COCO) / "imgid" (optional)}, ...]}

An image's path is image_root/filepath/filename and must stay under image_root. Every field is
checked, and every image file must exist, before any model work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.files import read_json, require
from vlp.pipeline.eval.images import ImageRef, check_images_exist, path_under


@dataclass(frozen=True)
class KarpathyImage:
    image: ImageRef
    image_id: int  # COCO's `cocoid` when present (its results format), else `imgid`, else index
    sentences: tuple[str, ...]


def read_karpathy(json_path: str | Path, image_root: str | Path,
                  splits: Sequence[str]) -> list[KarpathyImage]:
    """The images of `splits`, in file order; an error when none of them has an image."""
    data = read_json(json_path, "Karpathy split JSON")
    entries = require(data, "images", str(json_path), list)
    images, present = [], set()
    for i, entry in enumerate(entries):
        where = f"{json_path}: images[{i}]"
        entry_split = require(entry, "split", where, str)
        present.add(entry_split)
        if entry_split not in splits:
            continue
        filename = require(entry, "filename", where, str)
        filepath = require(entry, "filepath", where, str) if "filepath" in entry else ""
        path = path_under(image_root, os.path.join(filepath, filename), where)
        sentences = tuple(require(s, "raw", f"{where}.sentences[{j}]", str)
                          for j, s in enumerate(require(entry, "sentences", where, list)))
        id_key = next((key for key in ("cocoid", "imgid") if key in entry), None)
        image_id = i if id_key is None else require(entry, id_key, where, int)
        images.append(KarpathyImage(ImageRef(str(path)), image_id, sentences))
    named = repr(splits[0]) if len(splits) == 1 else str(list(splits))
    if not images:
        raise UserError(
            f"{json_path}: split {named} has no images; splits present: {sorted(present)}"
        )
    check_images_exist([image.image for image in images],
                       f"{json_path} (split {named}, image root {image_root})")
    return images
